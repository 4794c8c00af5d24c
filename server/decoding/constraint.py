"""What a request's output must match: a regex, a list of choices, a JSON schema or a Lark grammar.

Plain data (a kind and its text), so it travels inside `DecodingParams` between processes as is; what it
compiles to (`server.decoding.matching`) lives in each process's own cache, keyed by the vocabulary and
this value. The constraint applies to the output text exactly as the API returns it.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.errors import InvalidArgument

KINDS = ("regex", "choice", "json_schema", "grammar")
MAX_CHOICES = 1024
DEFAULT_MAX_CHARS = 65_536  # the server's `constraint_max_chars` unless it sets another


@dataclass(frozen=True)
class Constraint:
    """`kind` is one of KINDS. `text` is the regex (Rust `regex` syntax, matched against the whole output),
    the JSON schema (as JSON text) or the Lark grammar; `choices` the allowed outputs of kind "choice"."""

    kind: str
    text: str = ""
    choices: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.choices, list):
            object.__setattr__(self, "choices", tuple(self.choices))

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        return cls("regex", pattern)

    @classmethod
    def choice(cls, values) -> Constraint:
        return cls("choice", choices=tuple(values))

    @classmethod
    def json_schema(cls, schema: str) -> Constraint:
        return cls("json_schema", schema)

    @classmethod
    def grammar(cls, lark: str) -> Constraint:
        return cls("grammar", lark)

    @property
    def field(self) -> str:
        """The domain field that names it in errors ("constraint.regex"; the API prefixes "options.")."""
        return f"constraint.{self.kind}" + (".values" if self.kind == "choice" else "")

    @property
    def size(self) -> int:
        """Characters it holds (what `max_chars` bounds)."""
        return len(self.text) + sum(len(c) for c in self.choices)

    def validate(self, max_chars: int = DEFAULT_MAX_CHARS) -> Constraint:
        """Raise InvalidArgument naming the field when its shape is wrong (compiling is `matching`'s)."""
        if self.kind not in KINDS:
            raise InvalidArgument(field="constraint", value=self.kind,
                                  allowed="one of " + ", ".join(KINDS))
        field = self.field
        if self.kind == "choice":
            if self.text:
                raise InvalidArgument(f"{field}: a choice constraint has values, not text", field=field)
            if not isinstance(self.choices, tuple) or not 1 <= len(self.choices) <= MAX_CHOICES:
                count = len(self.choices) if isinstance(self.choices, tuple) else self.choices
                raise InvalidArgument(field=field, value=count, allowed=f"a list of 1 to {MAX_CHOICES} strings")
            for i, value in enumerate(self.choices):
                if not isinstance(value, str) or not value:
                    raise InvalidArgument(field=f"{field}[{i}]", value=value, allowed="a non-empty string")
        else:
            if self.choices:
                raise InvalidArgument(f"{field}: only a choice constraint has values", field=field)
            if not isinstance(self.text, str) or not self.text:
                raise InvalidArgument(field=field, value=self.text, allowed="a non-empty string")
        if self.size > max_chars:
            raise InvalidArgument(f"{field} must be at most {max_chars} characters long, got {self.size}",
                                  field=field, value=self.size, allowed=f"at most {max_chars} characters")
        return self
