"""`--config file.yaml` for every script: YAML keys are flag names, explicit CLI flags win."""

from __future__ import annotations

import argparse
import difflib
import os
from typing import Sequence

import yaml

from utils.errors import UserError, UserFileNotFoundError


def _known_dests(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """YAML key -> action: each flag's dest and every other name it has (`batch_size` for `--train_batch_size
    --batch_size`, a guide's or another script's name for the same setting)."""
    actions = {action.dest: action for action in parser._actions if action.dest != argparse.SUPPRESS}
    for action in list(actions.values()):
        for option in action.option_strings:
            if option.startswith("--"):
                actions.setdefault(option[2:].replace("-", "_"), action)
    return actions


def load_yaml_config(path: str) -> dict:
    """Read a YAML mapping of flag names to values. Hyphens in keys are read as underscores."""
    if not os.path.isfile(path):
        raise UserFileNotFoundError(f"--config {path}: no such file")
    with open(path, encoding="utf-8") as handle:
        try:
            data = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            raise UserError(f"--config {path}: not valid YAML ({error})") from error
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def _is_switch(action: argparse.Action) -> bool:
    """A flag without a value (`store_true`, `store_false`, `BooleanOptionalAction`)."""
    return action.nargs == 0 and isinstance(action.const, bool) or isinstance(action, argparse.BooleanOptionalAction)


def _check_type(action: argparse.Action, key: str, value, source: str):
    """YAML gives typed values; refuse the ones argparse would never have produced for this flag.

    A switch takes a YAML boolean only: `use_lora: "false"` is a non-empty string, and argparse-style
    truthiness would have turned the flag on."""
    if value is None:
        return value
    if _is_switch(action):
        if not isinstance(value, bool):
            raise UserError(f"--config {source}: '{key}: {value!r}' must be true or false (a YAML boolean, unquoted); "
                            f"--{key} is a switch.")
        return value
    if isinstance(value, (list, dict)) and action.nargs is None:
        raise UserError(f"--config {source}: '{key}' takes a single value, got {type(value).__name__} {value!r}.")
    numeric = action.type in (int, float)
    values = value if isinstance(value, list) else [value]
    for item in values:
        if numeric and (isinstance(item, bool) or not isinstance(item, (int, float, str))
                        or action.type is int and isinstance(item, float) and not item.is_integer()):
            raise UserError(f"--config {source}: '{key}: {item!r}' is not a valid {action.type.__name__}.")
    if numeric and not isinstance(value, list) and not isinstance(value, str):
        return action.type(value)
    return value


def apply_config_defaults(parser: argparse.ArgumentParser, config: dict, source: str) -> None:
    """Make `config` the parser's defaults, so any flag given on the command line overrides it."""
    actions = _known_dests(parser)
    for key, value in config.items():
        if key == "config":
            continue
        if key not in actions:
            close = difflib.get_close_matches(key, actions.keys(), n=3)
            hint = f" Did you mean {', '.join('--' + c for c in close)}?" if close else ""
            raise UserError(f"--config {source}: unknown key '{key}' (not a flag of this script).{hint}")
        action = actions[key]
        value = _check_type(action, key, value, source)
        if isinstance(value, str) and action.type is not None and action.nargs is None:
            try:
                value = action.type(value)
            except (TypeError, ValueError) as error:
                raise UserError(f"--config {source}: '{key}: {value}' is not a valid {getattr(action.type, '__name__', 'value')}") from error
        if action.nargs in ("+", "*") and value is not None and not isinstance(value, list):
            value = [value]
        if action.choices is not None and value is not None:
            values = value if isinstance(value, list) else [value]
            for item in values:
                if item not in action.choices:
                    raise UserError(
                        f"--config {source}: '{key}: {item}' is not one of {sorted(map(str, action.choices))}"
                    )
        # A required flag given by the file no longer has to be on the command line.
        action.required = False
        parser.set_defaults(**{action.dest: value})


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
                           mode_defaults=None) -> argparse.Namespace:
    """Parse `argv` after loading defaults from `--config FILE` if given.

    Precedence: command line > YAML file > `mode_defaults` > the parser's own defaults. `mode_defaults(first)`:
    defaults that depend on what kind of run this is (e.g. a DreamBooth run takes diffusers' DreamBooth scripts'
    defaults), from a first parse.
    """
    parser.add_argument(
        "--config",
        type=str,
        default=None,
        help="YAML file whose keys are flag names (e.g. `learning_rate: 1e-4`); flags given on the command line override it.",
    )
    pre_parser = argparse.ArgumentParser(add_help=False)
    pre_parser.add_argument("--config", type=str, default=None)
    known, _ = pre_parser.parse_known_args(argv)
    config = load_yaml_config(known.config) if known.config else {}
    apply_config_defaults(parser, config, known.config)
    if mode_defaults is not None:
        parser.set_defaults(**mode_defaults(parser.parse_known_args(argv)[0]))
        apply_config_defaults(parser, config, known.config)  # the file still wins over them
    return parser.parse_args(argv)


def add_hyphen_aliases(parser: argparse.ArgumentParser) -> None:
    """Accept `--batch-size` wherever `--batch_size` exists (guide 004's CLI uses hyphens)."""
    for action in list(parser._actions):
        for option in list(action.option_strings):
            if option.startswith("--") and "_" in option:
                alias = option.replace("_", "-")
                if alias not in parser._option_string_actions:
                    action.option_strings.append(alias)
                    parser._option_string_actions[alias] = action
