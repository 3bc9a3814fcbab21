"""utils/config.py: `--config file.yaml` (YAML keys = flag names, the command line wins) and hyphen aliases."""

import argparse

import pytest

from utils.config import add_hyphen_aliases, load_yaml_config, parse_args_with_config


def make_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--train_batch_size", type=int, default=16)
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    parser.add_argument("--validation_prompts", type=str, nargs="+", default=None)
    parser.add_argument("--use_ema", action="store_true")
    parser.add_argument("--dataset_name", type=str, required=True)
    return parser


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_yaml_sets_defaults_and_cli_overrides(tmp_path):
    config = write(tmp_path, "learning_rate: 3e-5\ntrain-batch-size: 4\nuse_ema: true\ndataset_name: d\n")
    args = parse_args_with_config(make_parser(), ["--config", config, "--train_batch_size", "8"])
    assert args.learning_rate == 3e-5  # YAML's "3e-5" is a string; converted with the flag's type
    assert args.train_batch_size == 8  # command line wins
    assert args.use_ema is True and args.dataset_name == "d" and args.config == config


def test_without_config_the_parser_defaults_hold():
    args = parse_args_with_config(make_parser(), ["--dataset_name", "x"])
    assert (args.learning_rate, args.train_batch_size, args.config) == (1e-4, 16, None)


def test_single_value_for_a_list_flag_becomes_a_list(tmp_path):
    config = write(tmp_path, "dataset_name: d\nvalidation_prompts: a cat\n")
    assert parse_args_with_config(make_parser(), ["--config", config]).validation_prompts == ["a cat"]


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    config = write(tmp_path, "dataset_name: d\nlearning_rat: 1e-4\n")
    with pytest.raises(ValueError) as error:
        parse_args_with_config(make_parser(), ["--config", config])
    assert "learning_rat" in str(error.value) and "--learning_rate" in str(error.value) and config in str(error.value)


def test_bad_choice_is_named(tmp_path):
    config = write(tmp_path, "dataset_name: d\nmixed_precision: fp8\n")
    with pytest.raises(ValueError, match="mixed_precision: fp8"):
        parse_args_with_config(make_parser(), ["--config", config])


def test_bad_type_is_an_error(tmp_path):
    config = write(tmp_path, "dataset_name: d\ntrain_batch_size: lots\n")
    with pytest.raises(ValueError, match="train_batch_size: lots' is not a valid int"):
        parse_args_with_config(make_parser(), ["--config", config])


@pytest.mark.parametrize("text, fragment", [("- a\n- b\n", "expected a mapping"), ("a: [unclosed\n", "not valid YAML")])
def test_malformed_yaml_is_named(tmp_path, text, fragment):
    config = write(tmp_path, text)
    with pytest.raises(ValueError) as error:
        load_yaml_config(config)
    assert fragment in str(error.value) and config in str(error.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="--config"):
        parse_args_with_config(make_parser(), ["--config", str(tmp_path / "nope.yaml")])


def test_empty_yaml_is_no_overrides(tmp_path):
    config = write(tmp_path, "")
    assert load_yaml_config(config) == {}
    with pytest.raises(SystemExit):  # the required flag is still required
        parse_args_with_config(make_parser(), ["--config", config])


def test_hyphen_aliases():
    parser = make_parser()
    add_hyphen_aliases(parser)
    args = parser.parse_args(["--train-batch-size", "3", "--dataset-name", "d", "--learning_rate", "0.5"])
    assert (args.train_batch_size, args.dataset_name, args.learning_rate) == (3, "d", 0.5)


@pytest.mark.parametrize("text, fragment", [
    ('use_ema: "false"\n', "'use_ema: 'false'' must be true or false"),   # quoted: a non-empty string, was "on"
    ("use_ema: 0\n", "'use_ema: 0' must be true or false"),
    ("use_ema: yes please\n", "must be true or false"),
    ("train_batch_size: true\n", "'train_batch_size: True' is not a valid int"),
    ("train_batch_size: 2.5\n", "'train_batch_size: 2.5' is not a valid int"),
    ("learning_rate: [1, 2]\n", "'learning_rate' takes a single value, got list"),
])
def test_yaml_values_of_the_wrong_type_are_refused_by_key(tmp_path, text, fragment):
    """A quoted "false" for a switch used to turn the switch on; every such value now names its key."""
    from utils.errors import UserError

    config = write(tmp_path, "dataset_name: d\n" + text)
    with pytest.raises(UserError) as error:
        parse_args_with_config(make_parser(), ["--config", config])
    assert fragment in str(error.value) and config in str(error.value)


def test_yaml_booleans_and_numbers_of_the_right_type_pass(tmp_path):
    config = write(tmp_path, "dataset_name: d\nuse_ema: false\ntrain_batch_size: 4.0\nlearning_rate: 2\n")
    args = parse_args_with_config(make_parser(), ["--config", config])
    assert args.use_ema is False and args.train_batch_size == 4 and isinstance(args.train_batch_size, int)
    assert args.learning_rate == 2.0
