"""What every config dataclass shares: to/from dicts and JSON, every unknown key named at once, a
section's errors named by their path in the whole config, and setting a value by dotted path."""
from __future__ import annotations

import dataclasses
import json

from diad_jax.errors import ConfigError


def as_tuple(x):
    """Lists (as JSON gives them) as tuples, nested ones too; anything else as it is."""
    return tuple(as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def set_path(d: dict, path: str, value) -> None:
    """d["a"]["b"] = value for path "a.b" (the sections on the way copied, so `d` may share them)."""
    head, _, rest = path.partition(".")
    if rest:
        d[head] = dict(d.get(head) or {})
        set_path(d[head], rest, value)
    else:
        d[head] = value


class Section:
    """Serialisation shared by the config dataclasses: `to_dict` / `to_json`, and `from_dict` /
    `from_json` that build nested sections, name every unknown key as `<where>.<key>` and a value of
    the wrong kind by `where`, and re-raise a section's ConfigError with its fields under the
    section's name (`eval.sigma`)."""

    # {field name: config class} of the fields that are sections themselves
    SECTIONS: dict[str, type] = {}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, s: str):
        return cls.from_dict(json.loads(s))

    @classmethod
    def _unknown_keys(cls, d: dict, where: str) -> list[tuple[str, set, set]]:
        """(where, unknown keys, known keys) of `d` and of every section in it: all of them, so
        that one error names every key a file gets wrong."""
        known = {f.name for f in dataclasses.fields(cls)}
        found = [(where, set(d) - known, known)] if set(d) - known else []
        for k, v in d.items():
            if k in cls.SECTIONS and isinstance(v, dict):
                found += cls.SECTIONS[k]._unknown_keys(v, f"{where}.{k}")
        return found

    @classmethod
    def from_dict(cls, d: dict, where: str | None = None):
        """The config that `d` (as `to_dict` gives it) describes; `where` (default: the class name)
        names it in errors that are not about one field's value: unknown keys, a value of the wrong
        kind, `d` not being a mapping."""
        where = where or cls.__name__
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a mapping of fields, got {d!r}")
        unknown = cls._unknown_keys(d, where)
        if unknown:
            raise ConfigError("; ".join(f"{w}: unknown keys {sorted(keys)} (known: {sorted(known)})"
                                        for w, keys, known in unknown))
        d = dict(d)
        for k, section in cls.SECTIONS.items():
            if isinstance(d.get(k), dict):
                try:
                    d[k] = section.from_dict(d[k], f"{where}.{k}")
                except ConfigError as e:
                    raise e.under(k) from e.__cause__
        try:
            return cls(**d)
        except TypeError as e:  # a value of the wrong kind, e.g. a string where a number goes
            raise ConfigError(f"{where}: {e}") from e
