"""MSHNet infrared small-target segmentation: model and loss, IRSTD data, metrics."""
