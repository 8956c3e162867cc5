"""The parser of every lympho-mil command: LightningCLI's, with abbreviations refused and a
bad option told in one line ("unknown option X; did you mean Y?") instead of the usage."""

from __future__ import annotations

import difflib
import inspect
import re
import sys
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser

NOT_FOR = {"cv": {"--ckpt_path": "it trains every fold's model itself"}}
"""Options of other subcommands that a subcommand refuses, and why."""


class LymphoParser(LightningArgumentParser):
    """LightningArgumentParser with ``allow_abbrev=False`` (``--trainer.max_epoch`` would be
    taken as ``--trainer.max_epochs``) and short errors: ``lympho-mil: error: ...`` and a
    pointer to ``--help``, exit status 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Any = None, *more: Any, **kwargs: Any) -> Any:
        self.given = list(sys.argv[1:] if args is None else args)  # for `error`'s pointer
        return super().parse_args(args, *more, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # a nested parser, or from Python: the caller reports it
            super().error(message, ex)
        command = self.prog.replace(" [options]", "")
        if command == "lympho-mil":  # the main parser checks the subcommand's values too
            given = getattr(self, "given", [])
            command += next((f" {a}" for a in given if not a.startswith("-")), "")
        print(f"lympho-mil: error: {short_message(message, self)}", file=sys.stderr)
        print(f"({command} --help lists the options)", file=sys.stderr)
        raise SystemExit(2)


def short_message(message: str, parser: Any = None) -> str:
    """One line for a jsonargparse error ``message`` (``parser``: where the options are
    looked up for a suggestion)."""
    options = sorted(getattr(parser, "_option_string_actions", {})) if parser else []
    subcommand = getattr(parser, "prog", "").split()[-1] if parser else ""
    unrecognized = re.match(r"unrecognized arguments: (.*)", message, flags=re.S)
    if unrecognized:
        given = [t.split("=")[0] for t in unrecognized.group(1).split() if t.startswith("-")]
        refused = NOT_FOR.get(subcommand, {})
        for option in given:
            if option in refused:
                return f"{option} does not apply to {subcommand}: {refused[option]}"
        return "; ".join(_unknown(option, options) for option in given) or message
    rejected = re.search(r"Option '(\w+)' is not accepted", message)
    if rejected:
        section = _last(r'Parser key "([\w.]+)"', message)
        names = _init_arguments(_last(r"class_path '([\w.]+)'", message))
        key = f"{section}.{rejected.group(1)}" if section else rejected.group(1)
        suggestion = difflib.get_close_matches(rejected.group(1), names, n=1)
        hint = f"; did you mean {section}.{suggestion[0]}?" if suggestion else ""
        return f"unknown option {key}{hint}"
    required = re.search(r"the following arguments are required: (.*)", message)
    if required:
        if required.group(1).strip() == "root":
            return "no data root given: pass --data.root PATH (or data.init_args.root in a config)"
        return f"missing required option(s): {required.group(1).strip()}"
    keys = list(re.finditer(r'Parser key "([\w.]+)"', message))
    inner = message[keys[-1].end() :] if keys else ""
    value = re.search(r"Given value: (.*)", inner)
    if keys and value:
        where = ".".join(dict.fromkeys(k.group(1) for k in (keys[0], keys[-1])))
        types = dict.fromkeys(re.findall(r"Expected a <class '([\w.]+)'>", inner[: value.start()]))
        wanted = f" (expected {' or '.join(types)})" if types else ""
        return f"invalid value {value.group(1).strip()} for {where}{wanted}"
    return " ".join(message.split())


def _unknown(option: str, options: list[str]) -> str:
    """``unknown option X`` with the closest known option, if one is close."""
    last = option.lstrip("-").split(".")[-1].replace("-", "_")
    same = [o for o in options if o.lstrip("-").split(".")[-1] == last]
    close = same or difflib.get_close_matches(option.replace("-", "_"), options, n=1)
    if not close:
        by_name = {o.lstrip("-").split(".")[-1]: o for o in options}
        close = [by_name[n] for n in difflib.get_close_matches(last, list(by_name), n=1)]
    return f"unknown option {option}" + (f"; did you mean {close[0]}?" if close else "")


def _last(pattern: str, text: str) -> str | None:
    found = re.findall(pattern, text)
    return found[-1] if found else None


def _init_arguments(class_path: str | None) -> list[str]:
    """The constructor arguments of ``class_path`` and of the bases its ``**kwargs`` reach."""
    if not class_path:
        return []
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(sys.modules[module], name)
    except (KeyError, AttributeError):
        return []
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        names += [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD][1:]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names
