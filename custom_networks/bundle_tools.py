"""Sharing HyperSpace bundles: verify a bundle, export a TorchScript UNet for one spacing, pack a zip.

A HyperSpace bundle has the model-zoo layout (``configs/metadata.json``, ``configs/inference.json``
whose ``network_def`` is a :class:`~custom_networks.HyperUNet`, ``models/model.pt`` holding the
network's plain ``state_dict``, ``docs/README.md``, ``LICENSE``). These tools wrap MONAI's bundle
API (``verify_metadata``, ``verify_net_in_out``, ``ConfigParser``, ``save_net_with_metadata``)
with what a spacing-conditioned network needs in addition.

Command line (python-fire)::

    python -m custom_networks.bundle_tools verify bundles/<name>
    python -m custom_networks.bundle_tools export bundles/<name> --spacing 1.5,1.5,3
    python -m custom_networks.bundle_tools pack bundles/<name>

The ``spacing`` input in ``metadata.json``
-------------------------------------------
``HyperUNet.forward(image, spacing)`` takes a second input, the voxel spacing: a ``(B, D)`` float32
tensor in mm, one value per spatial axis of ``image`` in the same axis order (``MetaTensor.pixdim``
after the bundle's ``Orientationd``). Following the specification's shape convention
``(batch, num_channels, *spatial_shape)``, it is described under ``network_data_format.inputs``
as ``D`` channels and no spatial axes; ``value_range`` is the smallest and largest trained
spacing over all axes, and ``channel_def`` gives each axis' own range.
:func:`spacing_input_description` writes the entry; for the SPIDER range it is::

    "spacing": {
        "type": "tuples",
        "format": "spacing_mm",
        "modality": "n/a",
        "num_channels": 3,
        "spatial_shape": [],
        "dtype": "float32",
        "value_range": [0.2, 5.0],
        "is_patch_data": false,
        "channel_def": {"0": "voxel spacing (mm) along image axis 0, trained 1-5 mm",
                        "1": "voxel spacing (mm) along image axis 1, trained 0.2-1.5 mm",
                        "2": "voxel spacing (mm) along image axis 2, trained 0.2-1.5 mm"}
    }

:func:`verify` checks this entry against the ``image`` input (``num_channels`` equals the number
of image spatial axes, ``spatial_shape`` is ``[]``, dtype ``float32``, ``value_range`` two positive
numbers) and runs MONAI's ``verify_net_in_out`` with the spacing passed to ``forward`` through
``extra_forward_args``, at both ends of ``value_range``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
import zipfile
from pathlib import Path

import torch

from .fileio import atomic_output
from .spacing import SpacingRange, parse_spacing

__all__ = ["export", "find_schema", "pack", "spacing_input_description", "verify"]

SCHEMA_NAME = "meta_schema.json"
# the schema kept in this repository; a packed bundle carries a copy at PACKED_SCHEMA
REPO_SCHEMA = Path(__file__).resolve().parents[1] / "bundles" / SCHEMA_NAME
PACKED_SCHEMA = Path("configs") / SCHEMA_NAME
SPACING_FORMAT = "spacing_mm"
# left out of a packed bundle: evaluation outputs, TensorBoard runs, caches
PACK_EXCLUDE_DIRS = frozenset({"eval", "eval_interactive", "runs", "__pycache__", "dist"})
PACKAGE_DIR = Path(__file__).resolve().parent


def find_schema(bundle_dir) -> Path:
    """The metadata schema to verify ``bundle_dir`` against: this repository's
    ``bundles/meta_schema.json``, else the copy a packed bundle carries in ``configs/``.

    Raises:
        FileNotFoundError: if neither exists (MONAI would otherwise try to download the URL
            named in ``metadata.json``).
    """
    packed = Path(bundle_dir) / PACKED_SCHEMA
    for candidate in (REPO_SCHEMA, packed):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no metadata schema found: looked for {REPO_SCHEMA} (this repository) and {packed} (a packed "
        "bundle); copy the repository's bundles/meta_schema.json to the latter (verify also takes --schema <file>)."
    )


def spacing_input_description(spacing_range, image_axes: str = "image") -> dict:
    """The ``network_data_format.inputs.spacing`` entry for a model trained on ``spacing_range``.

    Args:
        spacing_range: a :class:`~custom_networks.SpacingRange` or its config form
            ``[[low, high], ...]`` (mm, one pair per spatial axis in tensor axis order), e.g.
            ``get_dataset("spider").spacing_range``.
        image_axes: how ``channel_def`` names the input whose axes the spacing describes.

    Example::

        >>> spacing_input_description([[1, 5], [0.2, 1.5], [0.2, 1.5]])["value_range"]
        [0.2, 5.0]
    """
    spacing_range = SpacingRange.from_config(spacing_range)
    channel_def = {
        str(axis): f"voxel spacing (mm) along {image_axes} axis {axis}, trained {lo:g}-{hi:g} mm"
        for axis, (lo, hi) in enumerate(zip(spacing_range.low, spacing_range.high))
    }
    return {
        "type": "tuples",
        "format": SPACING_FORMAT,
        "modality": "n/a",
        "num_channels": spacing_range.spatial_dims,
        "spatial_shape": [],
        "dtype": "float32",
        "value_range": [min(spacing_range.low), max(spacing_range.high)],
        "is_patch_data": False,
        "channel_def": channel_def,
    }


def _bundle_paths(bundle_dir, config: str = "configs/inference.json") -> tuple[Path, Path, Path]:
    bundle = Path(bundle_dir)
    if not bundle.is_dir():
        raise FileNotFoundError(f"bundle folder {bundle} does not exist.")
    meta_file = bundle / "configs" / "metadata.json"
    config_file = Path(config) if Path(config).is_absolute() else bundle / config
    for path, what in ((meta_file, "metadata"), (config_file, "config")):
        if not path.is_file():
            raise FileNotFoundError(f"bundle {bundle} has no {what} file {path}; expected the model-zoo layout.")
    return bundle, meta_file, config_file


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _spacing_input(metadata: dict, meta_file: Path) -> tuple[list[float], int]:
    """Check the ``spacing`` input description against the ``image`` input (see the module
    docstring); return its value range (mm) and the number of spatial axes."""
    inputs = metadata.get("network_data_format", {}).get("inputs", {})
    if "image" not in inputs:
        raise ValueError(f"{meta_file}: network_data_format.inputs has no 'image' entry; found {sorted(inputs)}.")
    dims = len(inputs["image"].get("spatial_shape", []))
    example = json.dumps(spacing_input_description([[0.5, 3.0]] * max(dims, 1)))
    spacing = inputs.get("spacing")
    if spacing is None:
        raise ValueError(
            f"{meta_file}: network_data_format.inputs has no 'spacing' entry, the HyperUNet's second input; "
            f"expected e.g. \"spacing\": {example} (custom_networks.bundle_tools.spacing_input_description "
            "writes it from the trained spacing range)."
        )
    problems = []
    if spacing.get("format") != SPACING_FORMAT:
        problems.append(f"format {spacing.get('format')!r} should be {SPACING_FORMAT!r}")
    if spacing.get("num_channels") != dims:
        problems.append(f"num_channels {spacing.get('num_channels')!r} should be {dims}, the image's spatial axes")
    if spacing.get("spatial_shape") != []:
        problems.append(f"spatial_shape {spacing.get('spatial_shape')!r} should be [] (a (B, {dims}) tensor)")
    if spacing.get("dtype") != "float32":
        problems.append(f"dtype {spacing.get('dtype')!r} should be 'float32'")
    value_range = spacing.get("value_range")
    ok_range = (
        isinstance(value_range, list)
        and len(value_range) == 2
        and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in value_range)
        and value_range[0] <= value_range[1]
    )
    if not ok_range:
        problems.append(f"value_range {value_range!r} should be [smallest, largest] trained spacing in mm")
    if problems:
        raise ValueError(f"{meta_file}: network_data_format.inputs.spacing: " + "; ".join(problems) + f". Example: {example}")
    return [float(v) for v in value_range], dims


def verify(
    bundle_dir,
    spacing=None,
    config: str = "configs/inference.json",
    net_id: str = "network_def",
    device=None,
    n: int | None = None,
    schema=None,
) -> None:
    """Verify a bundle's metadata and its network's inputs and outputs.

    1. ``metadata.json`` against the schema (:func:`find_schema`, or ``schema``) with MONAI's
       ``verify_metadata``; the schema file exists, so nothing is downloaded.
    2. ``version`` is listed in ``changelog``; the ``spacing`` input is described as in the module
       docstring.
    3. MONAI's ``verify_net_in_out`` on ``net_id`` of ``config`` (``bundle_root`` = ``bundle_dir``):
       a random ``image`` of the metadata's shape and dtype, ``forward(image, spacing=...)`` with a
       ``(1, D)`` float32 spacing tensor (mm) passed through ``extra_forward_args``, at both ends of
       the spacing ``value_range`` (isotropic), or at ``spacing`` if given; the output must have
       the ``pred`` channel number and dtype. The checkpoint is not loaded (shapes only).

    Args:
        bundle_dir: the bundle folder.
        spacing: spacing to test (mm, tensor axis order): ``"1.5,1.5,3"``, a number or a list.
        config: config file holding ``net_id``, relative to ``bundle_dir``.
        net_id: id of the network in ``config``.
        device: device of the check; MONAI's default (``cuda:0`` if available) when None.
        n: the value of ``n`` in ``spatial_shape`` entries such as ``"16*n"`` (MONAI's default 1).
            The image must leave the UNet's bottleneck more than one voxel (InstanceNorm), e.g.
            ``"16*n"`` for a 4-level UNet.
        schema: a schema file to use instead of :func:`find_schema`'s.

    Raises:
        FileNotFoundError: missing bundle, metadata, config or schema file.
        ValueError: naming the file and what is wrong, for any failed check.
    """
    from monai.bundle import verify_metadata, verify_net_in_out

    bundle, meta_file, config_file = _bundle_paths(bundle_dir, config)
    schema = Path(schema) if schema is not None else find_schema(bundle)
    if not schema.is_file():
        raise FileNotFoundError(f"schema file {schema} does not exist.")
    metadata = _read_json(meta_file)
    if "schema" not in metadata:
        # MONAI's verify_metadata insists on the key even when the schema file is given
        raise ValueError(f"{meta_file} has no 'schema' key (the URL of the MONAI metadata schema it follows).")
    try:
        verify_metadata(meta_file=str(meta_file), filepath=str(schema), create_dir=False)
    except ValueError as e:
        # MONAI's message names the metadata's schema URL, not the file used; the jsonschema error
        # it wraps knows where in the metadata the problem is
        cause = e.__cause__
        where = ".".join(str(p) for p in getattr(cause, "absolute_path", [])) or "top level"
        detail = getattr(cause, "message", str(e))
        raise ValueError(f"{meta_file} does not follow the bundle metadata schema {schema}: at {where}: {detail}") from e
    if metadata["version"] not in metadata["changelog"]:
        raise ValueError(f"{meta_file}: version {metadata['version']!r} is missing from changelog {sorted(metadata['changelog'])}.")
    value_range, dims = _spacing_input(metadata, meta_file)
    print(f"metadata ok: {meta_file} (schema {schema})")

    if spacing is None:
        spacings = [(value_range[0],) * dims, (value_range[1],) * dims]
    else:
        spacings = [parse_spacing(spacing, dims)]
    for s in spacings:
        try:
            verify_net_in_out(
                net_id=net_id,
                meta_file=str(meta_file),
                config_file=str(config_file),
                device=device,
                n=n,
                extra_forward_args={"spacing": torch.tensor([s], dtype=torch.float32)},
                bundle_root=str(bundle),
            )
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            hint = ""
            if "spatial element" in str(e):
                hint = (
                    " The test image, sized from inputs.image.spatial_shape with n="
                    f"{n or 1}, is too small for the UNet's levels: state larger sizes (e.g. '16*n' for 4 levels) or pass --n."
                )
            raise ValueError(
                f"network {net_id!r} of {config_file} failed verify_net_in_out at spacing {list(s)} mm: {e}{hint}"
            ) from e
        print(f"network ok: {net_id} of {config_file} at spacing {list(s)} mm")


def _parser(bundle: Path, meta_file: Path, config_file: Path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(f=str(config_file))
    parser.read_meta(f=str(meta_file))
    parser["bundle_root"] = str(bundle)
    return parser


def _spacing_tag(spacing) -> str:
    return "x".join(f"{v:g}" for v in spacing)


def export(
    bundle_dir,
    spacing,
    output=None,
    ckpt=None,
    config: str = "configs/inference.json",
    net_id: str = "network_def",
    key_in_ckpt: str = "",
) -> str:
    """Export the plain UNet the bundle's HyperUNet generates for one spacing, as TorchScript.

    The file has the layout of MONAI's ``ckpt_export`` output (``save_net_with_metadata``): extra
    file ``metadata.json`` (the bundle's metadata) and ``inference.json`` (the config), so
    ``monai.data.load_net_with_metadata`` reads it. The metadata gains
    ``"generated_for_spacing_mm": [s0, s1, s2]`` and loses the ``spacing`` input: the exported
    UNet's weights are fixed for that spacing, it takes only the image (a ``spacing`` argument is
    accepted and ignored). Its output equals ``HyperUNet.forward(image, spacing)``.

    Args:
        bundle_dir: the bundle folder.
        spacing: the spacing (mm, tensor axis order) to generate for: ``"1.5,1.5,3"``, a number
            (isotropic) or a list.
        output: the ``.ts`` file; default ``<bundle_dir>/models/model_<s0>x<s1>x<s2>mm.ts``.
        ckpt: the weights; default ``<bundle_dir>/models/model.pt`` (a plain ``state_dict``).
        config: config file holding ``net_id``, relative to ``bundle_dir``.
        net_id: id of the HyperUNet in ``config``.
        key_in_ckpt: for a nested checkpoint ``{"model": state_dict, ...}``, the key of the weights.

    Returns:
        the path of the written file. It is written to a temporary file and renamed, so an error
        leaves nothing behind.

    Raises:
        ValueError: a spacing that is not positive finite mm values (see ``parse_spacing``).
        FileNotFoundError: a missing checkpoint, naming it and how to train one.
        TypeError: a ``net_id`` that is not a hypernetwork with ``generate``.
    """
    from monai.bundle import ConfigParser
    from monai.data import save_net_with_metadata

    bundle, meta_file, config_file = _bundle_paths(bundle_dir, config)
    parser = _parser(bundle, meta_file, config_file)
    net = parser.get_parsed_content(net_id)
    if not callable(getattr(net, "generate", None)):
        raise TypeError(
            f"{net_id!r} of {config_file} is a {type(net).__name__}, not a HyperUNet with generate(spacing); "
            "for a plain network use `python -m monai.bundle ckpt_export`."
        )
    spacing = parse_spacing(spacing, net.spatial_dims)
    trained = parser.get("_meta_#network_data_format#inputs#spacing#value_range") or []
    if len(trained) == 2 and not all(trained[0] <= s <= trained[1] for s in spacing):
        warnings.warn(
            f"spacing {list(spacing)} mm lies outside the trained range {trained} mm of {meta_file}; "
            "the generated weights are extrapolated.",
            stacklevel=2,
        )
    ckpt = Path(ckpt) if ckpt is not None else bundle / "models" / "model.pt"
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"checkpoint {ckpt} not found. Train the bundle first (python -m monai.bundle run --config_file "
            f"{bundle / 'configs' / 'train.json'} --bundle_root {bundle}, see {bundle / 'docs' / 'README.md'}) "
            "or pass --ckpt <weights .pt>."
        )
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    if key_in_ckpt:
        if key_in_ckpt not in state:
            raise KeyError(f"checkpoint {ckpt} has no key {key_in_ckpt!r}; its keys: {sorted(state)[:10]}.")
        state = state[key_in_ckpt]
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise RuntimeError(f"checkpoint {ckpt} does not fit {net_id!r} of {config_file}: {e}") from e
    scripted = torch.jit.script(net.eval().generate(spacing))

    meta = copy.deepcopy(parser.get()["_meta_"])
    meta["generated_for_spacing_mm"] = list(spacing)
    meta.get("network_data_format", {}).get("inputs", {}).pop("spacing", None)
    # stored like ckpt_export: the config's name without extension + ".json", always as JSON
    extra_files = {f"{config_file.stem}.json": json.dumps(ConfigParser.load_config_file(str(config_file))).encode()}

    output = Path(output) if output is not None else bundle / "models" / f"model_{_spacing_tag(spacing)}mm.ts"
    if not output.suffix:
        output = output.with_suffix(".ts")
    with atomic_output(output) as tmp:
        save_net_with_metadata(scripted, str(tmp), include_config_vals=False, meta_values=meta, more_extra_files=extra_files)
    return str(output)


def _files_to_pack(folder: Path, skip=()) -> list[Path]:
    """Files under ``folder``, relative to it, leaving out PACK_EXCLUDE_DIRS, hidden entries,
    bytecode and the relative paths in ``skip``."""
    skip = {Path(p) for p in skip}
    files = []
    for root, dirs, names in os.walk(folder):
        rel_root = Path(root).relative_to(folder)
        dirs[:] = sorted(d for d in dirs if d not in PACK_EXCLUDE_DIRS and not d.startswith(".") and rel_root / d not in skip)
        files += [
            rel_root / n for n in sorted(names) if not n.startswith(".") and not n.endswith(".pyc") and rel_root / n not in skip
        ]
    return files


def pack(bundle_dir, output=None) -> str:
    """Zip a bundle so that it runs without this repository.

    The zip holds one folder named like the bundle (the specification's archive format) with the
    bundle's files (configs, docs, LICENSE, models/ if present; not ``eval/``, ``runs/``, ``dist/``,
    ``__pycache__``, hidden files), a copy of the ``custom_networks`` package at its root (so that
    ``PYTHONPATH=<unzipped bundle>`` makes ``import custom_networks`` work) and the metadata schema
    as ``configs/meta_schema.json`` (so :func:`verify` works on the unzipped bundle).

    Args:
        bundle_dir: the bundle folder; its name names the zip's folder.
        output: the zip file; default ``dist/<bundle name>_v<version>.zip`` under the current
            directory.

    Returns:
        the path of the zip, written to a temporary file and renamed (nothing half-written on error).
    """
    bundle, meta_file, _ = _bundle_paths(bundle_dir)
    metadata = _read_json(meta_file)
    if not metadata.get("version"):
        raise ValueError(f"{meta_file} has no 'version'; expected e.g. \"version\": \"0.1.0\".")
    name = bundle.resolve().name
    output = Path(output) if output is not None else Path("dist") / f"{name}_v{metadata['version']}.zip"
    schema = find_schema(bundle)
    # a bundle packed before carries the package and the schema: pack fresh copies instead
    files = [(bundle / rel, f"{name}/{rel.as_posix()}") for rel in _files_to_pack(bundle, skip=(PACKAGE_DIR.name, PACKED_SCHEMA))]
    files += [(PACKAGE_DIR / rel, f"{name}/{PACKAGE_DIR.name}/{rel.as_posix()}") for rel in _files_to_pack(PACKAGE_DIR)]
    files.append((schema, f"{name}/{PACKED_SCHEMA.as_posix()}"))
    if not (bundle / "models" / "model.pt").is_file():
        print(f"note: {bundle / 'models' / 'model.pt'} does not exist; the zip has no trained weights.")

    with atomic_output(output) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for src, arcname in files:
                zf.write(src, arcname)

    root = f"<dir>/{name}"
    print(
        f"packed {bundle} -> {output} ({len(files)} files). After `unzip {output} -d <dir>`:\n"
        f"  PYTHONPATH={root} python -m monai.bundle run --config_file {root}/configs/inference.json "
        f"--bundle_root {root} ...   (other overrides, e.g. --dataset_dir: see {root}/docs/README.md)\n"
        f"  PYTHONPATH={root} python -m custom_networks.bundle_tools verify {root}"
    )
    return str(output)


if __name__ == "__main__":
    import fire

    fire.Fire({"verify": verify, "export": export, "pack": pack})
