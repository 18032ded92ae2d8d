"""Class prompts `a {domain}photo of a {classname}`, with the reference's domain word per dataset preset."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

from .errors import InputError

# Domain words of the reference code (DataDream `generate/generate.py` and `datadream.py`); each ends in a space
# so that the empty domain gives "a photo of a {classname}".
DOMAIN_PRESETS: dict[str, str] = {
    "imagenet": "",
    "caltech101": "",
    "fgvc_aircraft": "aircraft ",
    "cars": "car ",
    "eurosat": "satellite ",
    "food101": "food ",
    "dtd": "texture ",
    "pets": "pet ",
    "flowers102": "flower ",
    "sun397": "scene ",
    "digits": "",
}

DEFAULT_TEMPLATE = "a {domain}photo of a {classname}"


def domain_for_preset(preset: str) -> str:
    """Returns the domain word of a dataset preset, e.g. `"aircraft "` for `fgvc_aircraft`."""
    if preset not in DOMAIN_PRESETS:
        raise ValueError(
            f"Unknown dataset preset {preset!r}. Choose one of {sorted(DOMAIN_PRESETS)}, or pass the domain "
            "word directly (e.g. `--domain 'bird '`)."
        )
    return DOMAIN_PRESETS[preset]


@dataclass
class PromptTemplate:
    """How a class name becomes a prompt, shared by generator training, generation and the classifier head."""

    domain: str = field(default="", metadata={"help": "Domain word with its trailing space, e.g. 'aircraft '."})
    template: str = field(default=DEFAULT_TEMPLATE, metadata={"help": "Needs the {domain} and {classname} fields."})
    clean_class_names: bool = field(
        default=False,
        metadata={"help": "Replace '_' by ' ' in class names. Off by default: the reference uses names raw."},
    )

    def __post_init__(self):
        if "{classname}" not in self.template:
            raise ValueError(f"`template` must contain '{{classname}}', got {self.template!r}.")
        try:
            self.template.format(domain="", classname="")
        except (KeyError, IndexError, ValueError) as err:
            raise InputError(
                f"`template` {self.template!r} has a field other than {{domain}} and {{classname}} ({err!r}), which "
                "no prompt can fill; write a literal brace as {{ or }}."
            ) from None
        if self.domain and not self.domain.endswith(" "):
            raise ValueError(f"`domain` must end with a space (it precedes 'photo'), got {self.domain!r}.")
        if self.domain and "{domain}" not in self.template:
            raise InputError(
                f"`template` {self.template!r} has no {{domain}} field, so the domain word {self.domain!r} (from "
                "--domain or --dataset_preset) would be left out of every prompt. Add {domain} (as in "
                f"{DEFAULT_TEMPLATE!r}) or leave the domain unset."
            )

    @classmethod
    def from_preset(cls, preset: str, **kwargs) -> PromptTemplate:
        return cls(domain=domain_for_preset(preset), **kwargs)

    def __call__(self, classname: str) -> str:
        if self.clean_class_names:
            classname = classname.replace("_", " ")
        return self.template.format(domain=self.domain, classname=classname)

    def to_dict(self) -> dict:
        return {"domain": self.domain, "template": self.template, "clean_class_names": self.clean_class_names}

    def check_distinct(self, class_names: list[str]) -> None:
        """Raises if two classes get the same prompt once case, accents and spacing are ignored (`prompt_key`).

        CLIP's tokenizer lower-cases and collapses spaces, so such classes (`Cat` / `cat`, `cafe` / `café`,
        `a_b` / `a b` with `clean_class_names`) get the same or nearly the same text embedding: the classifier's head
        cannot separate them, and stage 2 would prompt both alike.
        """
        seen: dict[str, str] = {}
        for name in class_names:
            key = prompt_key(self(name))
            if key in seen:
                raise InputError(
                    f"Classes {seen[key]!r} and {name!r} get prompts that differ only in case, accents or spacing "
                    f"({self(seen[key])!r}, {self(name)!r}): CLIP's tokenizer lower-cases text and collapses spaces, "
                    "so their text embeddings are (nearly) the same and no classifier head built on them can tell the "
                    "classes apart. Rename one of them (or merge them if they are one class)."
                )
            seen[key] = name


def prompt_key(prompt: str) -> str:
    """A prompt without case, accents or repeated spaces: `"a photo of a  Café"` -> `"a photo of a cafe"`."""
    text = "".join(c for c in unicodedata.normalize("NFKD", prompt) if not unicodedata.combining(c))
    return " ".join(text.casefold().split())
