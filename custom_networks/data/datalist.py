"""MONAI data lists from the official BraTS 2021, SPIDER, MM-WHS and vessel (SMILE-UHURA) folder layouts.

The layouts themselves (file templates, case id pattern, modalities) live in
:mod:`custom_networks.data.datasets`; this module finds the cases, pairs each image with its label,
splits them reproducibly and writes the list atomically. Command line::

    python -m custom_networks.data.datalist brats --root /data/BraTS2021 --output datalist.json
    python -m custom_networks.data.datalist spider --root /data/SPIDER --modality t2 --output spider_t2.json
    python -m custom_networks.data.datalist vessel --root /data/SMILE-UHURA --output vessel_datalist.json

A data set distributed already split (the vessel layout: ``train/``, ``validate/``, ``test/`` with
``*_label/`` beside them, :attr:`~custom_networks.DatasetSpec.split_folders`) keeps its split.

The JSON file has the Medical Segmentation Decathlon form that ``monai.data.load_decathlon_datalist``
reads: ``{"name", "description", "modality", "labels": {"0": "background", ...}, "training": [...],
"validation": [...], "test": [...]}``, each item ``{"image": path, "label": path}`` with absolute paths
(so the file works from any working directory; regenerate it when the data moves).
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys

from monai.data import load_decathlon_datalist, partition_dataset

from .datasets import DATASETS, SPLITS, DatasetSpec, get_dataset
from .fileio import atomic_output

__all__ = ["find_cases", "inference_items", "load_split", "make_datalist", "split_cases", "write_json_atomic"]


def _template_regex(template: str, case_pattern: str, modality: str, folder: str | None = None) -> re.Pattern:
    """A regex for a layout template; a second ``{case}`` must repeat the first (BraTS folder and file)."""
    parts, seen_case = [], False
    for part in re.split(r"(\{case\}|\{modality\}|\{split\})", template):
        if part == "{case}":
            parts.append("(?P=case)" if seen_case else f"(?P<case>{case_pattern})")
            seen_case = True
        elif part == "{modality}":
            parts.append(re.escape(modality))
        elif part == "{split}":
            parts.append(re.escape(str(folder)))
        else:
            parts.append(re.escape(part))
    return re.compile("".join(parts) + r"\Z")


def _natural_key(case: str) -> list:
    """Sort ``2`` before ``10`` (SPIDER ids are plain numbers)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", case)]


def _split_folders(spec: DatasetSpec) -> dict[str | None, str | None]:
    """Split name -> the folder filling ``{split}``; ``{None: None}`` for a layout of one pool of cases."""
    return {split: spec.split_folders[split] for split in SPLITS if split in spec.split_folders} or {None: None}


def _cases_on_disk(spec: DatasetSpec, root: str, modality: str, folder: str | None = None) -> dict[str, str]:
    """Case id -> image path for every file under ``root`` that fits the layout (in split ``folder``)."""
    pattern = spec.image_template.format(case="*", modality=modality, split=folder)
    regex = _template_regex(spec.image_template, spec.case_pattern, modality, folder)
    found = {}
    for path in glob.glob(os.path.join(root, pattern)):
        match = regex.match(os.path.relpath(path, root).replace(os.sep, "/"))
        if match:
            found[match.group("case")] = path
    return found


def _cases_by_split(spec: DatasetSpec, root: str, modality: str) -> dict[str | None, dict[str, str]]:
    """Split name (``None`` without split folders) -> case id -> image path."""
    return {split: _cases_on_disk(spec, root, modality, folder) for split, folder in _split_folders(spec).items()}


def _images(spec: DatasetSpec, root: str, modality: str) -> list[str]:
    """Every image of the layout under ``root``: split by split, each in natural order of the ids."""
    return [cases[c] for cases in _cases_by_split(spec, root, modality).values() for c in sorted(cases, key=_natural_key)]


def _example(spec: DatasetSpec, template: str, modality: str, case: str = "<case>") -> str:
    folders = [f for f in _split_folders(spec).values() if f]
    return template.format(case=case, modality=modality, split="{" + ",".join(folders) + "}" if folders else "")


def _layout_hint(spec: DatasetSpec, root: str, modality: str) -> str:
    """Why nothing matched, when another modality or data set layout does match."""
    others = [m for m in spec.modalities if m != modality and _images(spec, root, m)]
    if others:
        return f" Found {spec.name} images of modality {others}: pass modality={others[0]!r}?"
    for other in DATASETS.values():
        if other.image_template != spec.image_template and _images(other, root, other.modality):
            return f" The folder looks like a {other.name} data set: pass dataset={other.name!r}?"
    return ""


def _find_by_split(spec: DatasetSpec, root: str, modality: str) -> dict[str | None, list[dict[str, str]]]:
    """:func:`find_cases`, grouped by the split folder a case lies in (``None``: no split folders)."""
    if modality not in spec.modalities:
        raise ValueError(f"{spec.name} has no modality {modality!r}; expected one of {spec.modalities}.")
    root = os.path.abspath(os.path.expanduser(str(root)))
    example = _example(spec, spec.image_template, modality)
    if not os.path.exists(root):
        raise FileNotFoundError(f"{spec.name} data folder {root} does not exist; expected a folder holding {example}.")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"{spec.name} data folder {root} is a file; expected a folder holding {example}.")
    by_split = _cases_by_split(spec, root, modality)
    if not any(by_split.values()):
        pattern = os.path.join(root, _example(spec, spec.image_template, modality, case="*"))
        raise FileNotFoundError(
            f"no {spec.name} images in {root}: expected files matching {pattern} with a case id matching "
            f"'{spec.case_pattern}'.{_layout_hint(spec, root, modality)}"
        )
    found, missing = {}, []
    for split, images in by_split.items():
        folder = spec.split_folders.get(split) if split else None
        found[split] = []
        for case in sorted(images, key=_natural_key):
            label = os.path.join(root, spec.label_template.format(case=case, modality=modality, split=folder))
            if not os.path.isfile(label):
                missing.append(f"{images[case]} (expected label {label})")
            found[split].append({"image": images[case], "label": label})
    if missing:
        shown = "; ".join(missing[:5]) + (f"; and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{len(missing)} {spec.name} image(s) without a label: {shown}.")
    return found


def find_cases(dataset: str | DatasetSpec, root: str, modality: str | None = None) -> list[dict[str, str]]:
    """Every case of ``dataset`` under ``root``: ``[{"image": path, "label": path}, ...]``.

    Paths are absolute; cases are in natural order of their ids (``BraTS2021_00000`` ...,
    SPIDER ``1, 2, ..., 10``); in a layout with split folders (vessel) split by split (``train/``,
    ``validate/``, ``test/``). Files that do not fit the layout are ignored.

    Args:
        dataset: a registry name (``"brats"``, ``"spider"``, ``"spider_discs"``, ``"mmwhs"``,
            ``"vessel"``) or spec.
        root: the data set folder as distributed.
        modality: which image to pair with the label (default: the spec's, e.g. BraTS ``"t1ce"``,
            SPIDER ``"t1"``; SPIDER also ``"t2"``, whose masks are ``masks/N_t2.mha``).

    Raises:
        FileNotFoundError: ``root`` does not exist; no image fits the layout (the message gives the
            expected pattern, and the data set or modality that does fit, if any); an image has no
            label (naming the image and the expected label path).
        NotADirectoryError: ``root`` is a file.
        ValueError: unknown data set or modality.
    """
    spec = get_dataset(dataset)
    modality = spec.modality if modality is None else str(modality)
    return [item for items in _find_by_split(spec, root, modality).values() for item in items]


def _count(n: int, fraction: float) -> int:
    """Cases for a split of ``fraction``: at least one unless the fraction is 0."""
    return 0 if fraction == 0 else max(1, int(round(n * fraction)))


def split_cases(items: list, val_fraction: float = 0.2, test_fraction: float = 0.1, seed: int = 0) -> dict[str, list]:
    """Split ``items`` into training, validation and test lists, reproducibly.

    A ``numpy.random.RandomState(seed)`` permutation of ``items`` (in the given, sorted order): the
    first ``round(n * test_fraction)`` go to test, the next ``round(n * val_fraction)`` to
    validation, the rest to training, each list in permutation order. A non-zero fraction gets at
    least one case, so with the defaults every split is non-empty from 3 cases on.

    Raises:
        ValueError: a fraction outside [0, 1), fractions summing to 1 or more, or too few cases to
            leave one for training.
    """
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= float(f) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {f}.")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}.")
    n = len(items)
    n_test, n_val = _count(n, test_fraction), _count(n, val_fraction)
    if n - n_test - n_val < 1:
        raise ValueError(
            f"{n} case(s) are too few for {n_val} validation and {n_test} test case(s) plus one for training; "
            f"need at least {n_test + n_val + 1}, or lower val_fraction / test_fraction."
        )
    # MONAI's partition_dataset shuffles with RandomState(seed); ratios equal to the counts make
    # its cut points exactly these counts (it rounds ratios down, which would drop the minimum of one)
    test, val, training = partition_dataset(list(items), ratios=[n_test, n_val, n - n_test - n_val], shuffle=True, seed=seed)
    return {"training": training, "validation": val, "test": test}


def _official_split(found: dict, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list]:
    """The split of the folders; a validation or test folder that is missing or empty is drawn from
    the training cases (:func:`split_cases` with that split's fraction alone)."""
    splits = {split: list(found.get(split, [])) for split in SPLITS}
    missing = [split for split in ("validation", "test") if not splits[split]]
    if missing:
        drawn = split_cases(
            splits["training"],
            val_fraction if "validation" in missing else 0.0,
            test_fraction if "test" in missing else 0.0,
            seed,
        )
        splits["training"] = drawn["training"]
        for split in missing:
            splits[split] = drawn[split]
    return splits


def write_json_atomic(data, path: str) -> str:
    """Write ``data`` as JSON to ``path`` through a temporary file in the same folder and ``os.replace``.

    A reader sees the old file or the complete new one, never half a file; on an error the temporary
    file is removed and ``path`` is untouched. Returns the absolute path.
    """
    with atomic_output(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
    return os.path.abspath(os.path.expanduser(str(path)))


def make_datalist(
    dataset: str | DatasetSpec,
    root: str,
    output: str | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.1,
    seed: int = 0,
    modality: str | None = None,
) -> dict:
    """The data list of ``dataset`` under ``root``, split reproducibly; written to ``output`` if given.

    Args:
        dataset: ``"brats"``, ``"spider"``, ``"spider_discs"``, ``"mmwhs"`` or ``"vessel"`` (or a spec).
        root: the data set folder in its official layout.
        output: JSON file to write (atomically; nothing is written when an error is raised).
        val_fraction, test_fraction: shares of the cases for validation and test. A layout with
            split folders (vessel) keeps its own split; only a split whose folder is missing or
            empty is drawn from the training cases with its fraction.
        seed: seed of the split permutation; the same seed and files give the same lists.
        modality: image modality (default: the spec's; see :func:`find_cases`).

    Returns:
        ``{"name", "description", "modality", "labels", "training", "validation", "test"}``; see the
        module docstring.

    Raises:
        FileNotFoundError, NotADirectoryError, ValueError: see :func:`find_cases` and
        :func:`split_cases`; messages name the path or value.
    """
    spec = get_dataset(dataset)
    modality = spec.modality if modality is None else str(modality)
    found = _find_by_split(spec, root, modality)
    if spec.split_folders:
        splits = _official_split(found, val_fraction, test_fraction, seed)
    else:
        splits = split_cases(found[None], val_fraction, test_fraction, seed)
    datalist = {
        "name": spec.name,
        "description": spec.description,
        "modality": modality,
        "labels": {str(i): name for i, name in enumerate(spec.classes)},
        **splits,
    }
    if output is not None:
        write_json_atomic(datalist, output)
    return datalist


IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def load_split(dataset: str | DatasetSpec, dataset_dir: str, split: str, data_list_file: str | None = None, seed: int = 0) -> list[dict]:
    """One split (``"training"``, ``"validation"`` or ``"test"``) for a bundle workflow.

    From ``data_list_file`` (a MONAI data list JSON, e.g. written by :func:`make_datalist`) when
    given, read with MONAI's ``load_decathlon_datalist`` (relative paths are relative to the
    file's folder), otherwise from ``dataset_dir`` in its official layout with the default split.

    Raises:
        FileNotFoundError / ValueError: naming the file or folder, or the missing or empty split.
    """
    if data_list_file:
        if not os.path.isfile(data_list_file):
            raise FileNotFoundError(f"data list file {data_list_file} does not exist.")
        with open(data_list_file) as f:
            try:
                datalist = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"data list file {data_list_file} is not valid JSON ({e}); expected a MONAI data list "
                                 "such as {\"training\": [{\"image\": ..., \"label\": ...}], ...}.") from None
        if not isinstance(datalist, dict):
            raise ValueError(f"data list file {data_list_file} holds a {type(datalist).__name__}; expected a JSON object of splits.")
        if not datalist.get(split):
            raise ValueError(f"{data_list_file} has no {split!r} cases; expected a non-empty list under the key {split!r}.")
        return load_decathlon_datalist(data_list_file, is_segmentation=True, data_list_key=split)
    items = make_datalist(dataset, dataset_dir, seed=seed).get(split)
    if not items:
        raise ValueError(f"{dataset_dir} has no {split!r} cases; expected a non-empty list under the key {split!r}.")
    return items


def inference_items(input: str, dataset: str | DatasetSpec | None = None, split: str = "test") -> list[dict]:
    """``[{"image": path}, ...]`` to segment, from an image file, a folder, or a data list JSON.

    A folder in the official layout of ``dataset`` gives its images (of the default modality; with
    split folders, those of every split: ``train/``, ``validate/`` and ``test/``);
    any other folder gives every image file in it (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``,
    ``.mhd``); a ``.json`` data list gives its ``split``.

    Raises:
        FileNotFoundError: naming ``input`` when it does not exist or holds no image.
    """
    path = os.path.abspath(os.path.expanduser(str(input)))
    if not os.path.exists(path):
        raise FileNotFoundError(f"input {path} does not exist; expected an image file, a folder of images or a data list JSON.")
    if path.endswith(".json"):
        return [{"image": item["image"]} for item in load_split(dataset, "", split, path)]
    if os.path.isfile(path):
        return [{"image": path}]
    if dataset is not None:
        spec = get_dataset(dataset)
        images = _images(spec, path, spec.modality)
        if images:
            return [{"image": image} for image in images]
    files = sorted(f for f in glob.glob(os.path.join(path, "*")) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {path}.")
    return [{"image": f} for f in files]


def main(
    dataset: str,
    root: str,
    output: str | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.1,
    seed: int = 0,
    modality: str | None = None,
) -> None:
    """Command line: write the data list to ``--output`` (or print it) and report the split sizes."""
    datalist = make_datalist(dataset, str(root), output, val_fraction, test_fraction, seed, modality)
    sizes = ", ".join(f"{len(datalist[k])} {k}" for k in ("training", "validation", "test"))
    if output is None:
        print(json.dumps(datalist, indent=2))
    else:
        print(f"wrote {os.path.abspath(str(output))}: {sizes} ({datalist['name']}, {datalist['modality']})")


if __name__ == "__main__":
    import fire

    try:
        fire.Fire(main)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        # a user error: its message, not a traceback
        sys.exit(f"error: {e}")
