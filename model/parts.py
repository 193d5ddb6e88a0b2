"""What the pluggable parts of the network declare: their options, what a backbone outputs and what an aggregation
takes, the image sizes a backbone accepts, where pretrained weights come from, and how the key names of released
checkpoints map onto our modules.

Declarations only: the parser reads them (choices, option groups, checks) without building any module.
"""
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Tuple

# What a backbone can hand to its aggregation
MAP = "map"  # [B, C, h, w]
TOKENS = "tokens"  # [B, T, C], a transformer's patch tokens
CLASS_TOKEN = "class_token"  # [B, C], the first output token
SEQPOOL = "seqpool"  # [B, C], CCT's attention-weighted sum of its tokens
MAP_AND_CLASS_TOKEN = "map_and_class_token"  # ([B, C, h, w], [B, C])


@dataclass(frozen=True)
class Option:
    """A flag --<name> that a part declares, with argparse's type, default, help, choices, nargs, metavar, and the
    `minimum` the parser checks (every value, for several). Parts that share a flag each declare it (their
    defaults may differ: the chosen part's applies)."""
    name: str
    type: type
    default: Any
    help: str
    choices: Optional[tuple] = None
    nargs: Any = None
    metavar: Any = None
    minimum: Optional[float] = None


def option_values(options, source):
    """{name: value} of the declared `options` read from `source` (a namespace or a mapping); a value that is
    missing or None there takes the option's own default."""
    get = source.get if isinstance(source, Mapping) else lambda name, default=None: getattr(source, name, default)
    values = {}
    for option in options:
        value = get(option.name, None)
        values[option.name] = option.default if value is None else value
    return values


@dataclass(frozen=True)
class Features:
    """What a built backbone outputs: a layout above, the channels of each local descriptor (or of the vector),
    and for a MAP its (h, w) at the size the model was built for (None when unknown)."""
    layout: str
    channels: int
    map_size: Optional[Tuple[int, int]] = None


@dataclass(frozen=True)
class WeightsSource:
    """A pretrained weights file: downloaded once from `url` (a torch.hub-style name's SHA-256 prefix is checked)
    or Google Drive into torch.hub's cache (`in_hub_cache`) or <weights folder>/<subfolder>/, then read safely."""
    what: str
    file_name: str
    url: Optional[str] = None
    google_drive_id: Optional[str] = None
    in_hub_cache: bool = True
    subfolder: str = ""


@dataclass(frozen=True)
class BackboneRequest:
    """Everything a backbone builder gets: the registry `name`, the `layout` its aggregation takes, whether tokens
    go through the final norm, whether input sides are first rounded to the patch size (the model resizes), the
    --pretrain weights, --resize, its declared options' values, and `load_weights(module, WeightsSource,
    layout=None)`, which fetches the file, maps its keys by the KeyLayout and loads it strictly."""
    name: str
    layout: str
    pretrain: str
    resize: Tuple[int, int]
    options: Mapping[str, Any]
    load_weights: Callable
    final_norm: bool = True
    round_input_to_patch: bool = False


@dataclass(frozen=True)
class KeyLayout:
    """How a released checkpoint names one part's weights: `renames` (their prefix, our prefix), the first that
    matches a key applies; keys starting with a `dropped` prefix are ignored; our keys starting with an
    `optional` prefix may be missing from the file (they keep their initialisation: unused at inference)."""
    name: str
    renames: Tuple[Tuple[str, str], ...] = ()
    dropped: Tuple[str, ...] = ()
    optional: Tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------------------------
# Image sizes a backbone accepts: each rule gives None, or the message of a wrong --resize

def _resize_flag(size):
    return f"--resize {size[0]} {size[1]}"


@dataclass(frozen=True)
class AnySize:
    def error(self, name, resize):
        return None


@dataclass(frozen=True)
class FixedSizes:
    """Only these (H, W): a learned positional embedding of fixed length."""
    sizes: Tuple[Tuple[int, int], ...]

    def error(self, name, resize):
        if tuple(resize) in self.sizes:
            return None
        return (f"--backbone {name} needs {' or '.join(_resize_flag(size) for size in self.sizes)}, "
                f"got {_resize_flag(resize)}")


@dataclass(frozen=True)
class MultipleOf:
    """Sides that are multiples of a patch size."""
    patch: int

    def error(self, name, resize):
        if all(side % self.patch == 0 and side > 0 for side in resize):
            return None
        nearest = [max(self.patch, round(side / self.patch) * self.patch) for side in resize]
        return (f"--backbone {name} needs --resize sides that are multiples of {self.patch}, got "
                f"{_resize_flag(resize)}: the nearest valid is {_resize_flag(nearest)}")
