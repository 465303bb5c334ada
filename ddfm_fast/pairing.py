"""Pairing image files across folders by file stem, and the roles of the two sides of a fusion pair.

One pairing rule serves every command (``fuse``, ``eval``, ``compare``, ``score``): a file is an image when its
suffix is in :data:`ddfm_fast.io.IMAGE_SUFFIXES` (what :mod:`ddfm_fast.io` reads); hidden files (``.DS_Store``,
our own ``.*.part`` temporary files) and sub-folders are passed over; files pair when their names without the
extension agree (``a.png`` with ``a.jpg``). A stem that two files of one folder share (``a.png`` and ``a.jpg``)
is ambiguous and never guessed at.

Roles (the official driver's assignment, see ``ddfm_fast.api``): the ``ir`` side of a fusion pair is the
infrared image (IVF) or the functional CT / PET / SPECT image (MIF) and becomes the EM step's ``V``; the ``vis``
side is the visible image (IVF) or the MRI image (MIF) and becomes ``I``. The evaluator calls them A and B.
Colour output takes the chroma of the visible image (IVF) or of the functional image (MIF).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping, Optional

from ddfm_fast.io import IMAGE_SUFFIXES


class InputError(ValueError):
    """A folder or file given to a run cannot be used (missing, not a folder, no images); the message names it."""


# --------------------------------------------------------------------------------------------------- roles


@dataclass(frozen=True)
class Roles:
    """What the two sides of a pair are called in a fusion mode, where a dataset keeps them, and the colour side.

    ``ir`` / ``vis`` are the option and summary names of the two sides (``--ir-dir`` / ``--func-dir``, the
    summary's ``"ir"`` / ``"func"`` keys); ``ir_name`` / ``vis_name`` name them in messages and as the
    evaluator's A / B; ``ir_folders`` / ``vis_folders`` are the sub-folder names of a dataset folder
    (``ivf/MSRS/ir``, ``mif/MRI_PET/PET``), matched case-insensitively.
    """

    mode: str
    ir: str
    vis: str
    ir_name: str
    vis_name: str
    ir_long: str
    vis_long: str
    ir_folders: tuple[str, ...]
    vis_folders: tuple[str, ...]
    color_side: Literal["ir", "vis"]


ROLES: dict[str, Roles] = {
    "ivf": Roles("ivf", "ir", "vis", "infrared", "visible", "infrared image", "visible image",
                 ir_folders=("ir",), vis_folders=("vi", "vis"), color_side="vis"),
    "mif": Roles("mif", "func", "mri", "functional", "MRI", "functional (CT/PET/SPECT) image", "MRI image",
                 ir_folders=("CT", "PET", "SPECT"), vis_folders=("MRI",), color_side="ir"),
}
MODES = tuple(ROLES)


def roles(mode: str) -> Roles:
    """The roles of ``mode`` (``"ivf"`` or ``"mif"``)."""
    if mode not in ROLES:
        raise ValueError(f"mode must be one of {', '.join(ROLES)}, got {mode!r}")
    return ROLES[mode]


# --------------------------------------------------------------------------------------------------- pairing


@dataclass(frozen=True)
class Pair:
    """One matched stem: a file per folder label. ``stem`` names the output (``<stem>.png``).

    Fusion pairings use the labels ``"ir"`` and ``"vis"`` (:func:`pair_sources`), read as :attr:`ir` / :attr:`vis`.
    """

    stem: str
    files: Mapping[str, Path]

    @property
    def ir(self) -> Path:
        return self.files["ir"]

    @property
    def vis(self) -> Path:
        return self.files["vis"]

    @classmethod
    def of(cls, ir: Path, vis: Path, stem: Optional[str] = None) -> "Pair":
        """A fusion pair of two given files (named after the infrared / functional file unless ``stem``)."""
        return cls(Path(ir).stem if stem is None else stem, {"ir": Path(ir), "vis": Path(vis)})


@dataclass(frozen=True)
class Unmatched:
    """A stem that did not pair: why, which files hold it, and whether it is ambiguous (two files in a folder)."""

    stem: str
    reason: str
    files: tuple[Path, ...]
    ambiguous: bool


@dataclass
class Pairing:
    """The pairs of some folders, sorted by stem, and what did not pair.

    ``unmatched``: stems missing from a folder or ambiguous, with reasons; ``ignored``: files that are not
    images by their suffix; ``undriven``: with a driver folder, the other folders' stems it lacks.
    """

    pairs: list[Pair]
    unmatched: list[Unmatched] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)
    undriven: list[str] = field(default_factory=list)

    @property
    def unpaired(self) -> list[dict[str, str]]:
        """Files without a partner, one record per file (``{"file", "reason"}``), for a run's summary."""
        return [{"file": str(path), "reason": u.reason} for u in self.unmatched if not u.ambiguous for path in u.files]

    @property
    def ambiguous(self) -> list[Unmatched]:
        return [u for u in self.unmatched if u.ambiguous]

    def limit(self, n: Optional[int]) -> "Pairing":
        """The first ``n`` pairs (by stem); what did not pair is kept as it is."""
        if n is None or n >= len(self.pairs):
            return self
        if n < 1:
            raise ValueError(f"limit must be at least 1, got {n}")
        return Pairing(self.pairs[:n], list(self.unmatched), list(self.ignored), list(self.undriven))


def list_images(folder: Path, name: str) -> tuple[dict[str, list[Path]], list[Path]]:
    """stem -> image files of ``folder`` (not recursive, sorted), and the non-image files; raises
    :class:`InputError` naming the folder when it is missing, not a folder, or holds no images."""
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"{name} folder {folder}: no such folder")
    if not folder.is_dir():
        raise InputError(f"{name} folder {folder}: not a folder")
    by_stem: dict[str, list[Path]] = {}
    ignored: list[Path] = []
    for path in sorted(folder.iterdir()):
        # Sub-folders are not images; anything else named as an image (a broken or looping link, a FIFO) is paired
        # and then fails its pair with a line naming the file, as a single pair does, instead of vanishing.
        if path.name.startswith(".") or path.is_dir():
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            by_stem.setdefault(path.stem, []).append(path)
        else:
            ignored.append(path)
    if not by_stem:
        raise InputError(f"{name} folder {folder}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return by_stem, ignored


def pair_by_stem(folders: Mapping[str, Path], driver: Optional[str] = None,
                 describe: Optional[Mapping[str, str]] = None) -> Pairing:
    """Pair the image files of ``folders`` ({label: folder}) by stem.

    With a ``driver`` label only that folder's stems are candidates, and the other folders' extra stems are
    listed in ``undriven``; without one every stem of every folder is a candidate. ``describe`` names the labels
    in messages (default: the label). Raises :class:`InputError` for a missing or image-less folder.
    """
    name = {label: (describe or {}).get(label, label) for label in folders}
    listed = {label: list_images(folder, name[label]) for label, folder in folders.items()}
    stems_of = {label: set(by_stem) for label, (by_stem, _) in listed.items()}
    if driver is None:
        candidates = set().union(*stems_of.values())
    else:
        candidates = stems_of[driver]
    pairing = Pairing(pairs=[], ignored=[p for _, ignored in listed.values() for p in ignored])
    for stem in sorted(candidates):
        problems, held, ambiguous = [], [], False
        for label, (by_stem, _) in listed.items():
            files = by_stem.get(stem, [])
            held += files
            if len(files) > 1:
                ambiguous = True
                problems.append(f"{len(files)} {name[label]} files share the stem '{stem}' "
                                f"({', '.join(p.name for p in files)}); keep one of them")
            elif not files:
                problems.append(f"no {name[label]} file {stem}.* in {folders[label]}")
        if problems:
            pairing.unmatched.append(Unmatched(stem, "; ".join(problems), tuple(held), ambiguous))
        else:
            pairing.pairs.append(Pair(stem, {label: by_stem[stem][0] for label, (by_stem, _) in listed.items()}))
    if driver is not None:
        pairing.undriven = sorted(set().union(*(s for label, s in stems_of.items() if label != driver)) - candidates)
    return pairing


def pair_sources(ir_dir: Path, vis_dir: Path, mode: str = "ivf") -> Pairing:
    """The fusion pairs of an infrared (functional) folder and a visible (MRI) folder, labelled ``ir`` / ``vis``."""
    r = roles(mode)
    return pair_by_stem({"ir": Path(ir_dir), "vis": Path(vis_dir)}, describe={"ir": r.ir_name, "vis": r.vis_name})
