"""The one place for per-dataset decisions: classes, label maps, spacing ranges, patch sizes, widths,
file layouts; and the label / header checks that MONAI's loading transforms lack.

Axis convention: every per-axis value here (``spacing_range``, ``fs_target_spacing``, ``patch_size``,
``evaluation_ranges``) is in the order of the tensor's spatial axes after
``LoadImaged -> EnsureChannelFirstd -> Orientationd(axcodes=spec.axcodes)`` (see
:meth:`DatasetSpec.load_transforms`), i.e. the order of ``MetaTensor.pixdim``. All specs use
``axcodes="RAS"``: axis 0 runs left -> right, axis 1 posterior -> anterior, axis 2 inferior -> superior.

SPIDER is the data set where this matters. Its images are sagittal: the thick slices (3.3-4.8 mm) are
stacked left -> right, and where that axis sits in the array depends on how a file was written (ITK's
last index axis for a DICOM-like sagittal header, the first for a reoriented one; MONAI's ITKReader
keeps ITK's index order). After ``Orientationd("RAS")`` it is always axis 0, which is why the SPIDER
spacing range is
``[1, 5] x [0.2, 1.5] x [0.2, 1.5]`` mm and its patch ``(48, 128, 256)`` voxels: 48 thick slices
(about 160 mm left-right), 128 voxels front-back (about 77 mm at 0.6 mm: vertebral body and canal) and
256 along the spine (about 154 mm at 0.6 mm). The paper's "256x128x48" is the same patch in the
reversed (z, y, x) order of ``SimpleITK.GetArrayFromImage``.

The vessel data set (``"vessel"``, 7T time-of-flight MR angiography in the SMILE-UHURA /
StudyForrest layout) is the one whose files come already split: ``train/``, ``validate/`` and
``test/`` hold the images and ``train_label/``, ``validate_label/``, ``test_label/`` the labels of
the same file names. Its spec names those folders (``split_folders``), and it is the one data set
that trains with SPOCKMIP's maximum-intensity-projection loss beside the voxel loss and reports
clDice and connected components (``loss``, ``mip_*``, ``extra_metrics``); the others keep
MONAI's ``DiceCELoss`` and Dice alone.

Example::

    >>> from custom_networks import HyperUNet
    >>> spec = get_dataset("spider")
    >>> spec.classes, spec.patch_size
    (('background', 'vertebrae', 'spinal_canal'), (48, 128, 256))
    >>> net = HyperUNet(**spec.hypernetwork_kwargs())
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import EnsureChannelFirstd, LoadImaged, MapTransform, Orientationd

from ..losses import build_loss
from ..metrics import METRICS
from ..spacing import PHYSICAL_SPACING_MM, SpacingRange

__all__ = ["DATASETS", "MIN_SIZE", "SPLITS", "CheckImaged", "DatasetSpec", "MapLabelsd", "check_image", "format_values", "get_dataset"]

# fewest voxels per axis of an image to segment: below it no 3x3x3 convolution sees a neighbourhood
MIN_SIZE = 4
# the splits of a data list, in the order of the Medical Segmentation Decathlon's JSON
SPLITS = ("training", "validation", "test")


def format_values(values) -> str:
    """``[0, 1, 2, 3, 100, 0.5]`` -> ``"0-3, 100, 0.5"``: label values as short runs, for error messages."""
    ints = sorted(int(v) for v in values if float(v).is_integer())
    others = sorted(float(v) for v in values if not float(v).is_integer())
    runs: list[list[int]] = []
    for v in ints:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in runs]
    return ", ".join(parts + [repr(v) for v in others])


def _range_map(values: Sequence[int] | range, target: int) -> dict[int, int]:
    return {int(v): target for v in values}


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the bundles, the data list and the generated data need to know about one data set.

    Per-axis values are in tensor axis order after :meth:`load_transforms` (``Orientationd`` to
    ``axcodes``), the order of ``MetaTensor.pixdim``; see the module docstring.

    Args:
        name: registry key, e.g. ``"brats"``.
        description: one line for humans (bundle metadata, CLI messages).
        modality: the image the model reads by default, as named in the file layout (BraTS
            ``"t1ce"``, SPIDER ``"t1"``, MM-WHS ``"mr"``).
        modalities: the modalities the layout offers; a data list may pick any of them.
        classes: output class names, background first; ``len(classes)`` is the network's
            ``out_channels``.
        label_map: raw label value in the files -> class index. A value missing here is an error
            (see :class:`MapLabelsd`), not silently background.
        spacing_range: the training spacing range (mm), sampled uniformly per axis.
        fs_target_spacing: the fixed spacing (mm) of the FS / FSNR baselines.
        patch_size: training patch (voxels).
        channels: UNet feature channels per level (``len - 1`` downsamplings).
        hidden_features: widths of the hypernetwork's spacing MLP.
        zscore_nonzero: z-score over non-zero voxels only (skull-stripped BraTS: the zero outside
            the brain is not tissue).
        image_template, label_template: file paths relative to the data set root, with ``{case}``,
            ``{modality}`` and (with ``split_folders``) ``{split}`` placeholders and ``/`` separators.
        case_pattern: regular expression a case id must match (other folders/files are ignored).
        split_folders: for a data set distributed already split, split name (of :data:`SPLITS`)
            -> the folder that fills ``{split}`` in the templates, e.g. ``{"training": "train"}``;
            the data list keeps that split (see :func:`~custom_networks.data.datalist.make_datalist`).
            Empty: one pool of cases, split reproducibly by the data list.
        evaluation_ranges: named spacing intervals (mm) of the paper's Monte Carlo evaluation
            (Table 2).
        axcodes: orientation the images are brought to before any per-axis value applies.
        default_dir: where a bundle looks for the data set unless told (``--dataset_dir``).
        loss: the voxel loss of training, a name of :data:`custom_networks.losses.VOXEL_LOSSES`:
            ``"dice_ce"`` (the paper's DiceCE, every data set but vessels) or ``"focal_tversky"``.
        mip_weight, mip_axes, mip_slab_mm, mip_temperature: SPOCKMIP's MIP loss beside the voxel
            loss, ``(1 - mip_weight) * voxel + mip_weight * MIP`` (0: none); the arguments of
            :func:`custom_networks.losses.build_loss`, which ``train.json`` calls with them.
        extra_metrics: metrics evaluation reports beside Dice, names of
            :data:`custom_networks.metrics.METRICS` (e.g. ``"cldice"``).
    """

    name: str
    description: str
    modality: str
    modalities: tuple[str, ...]
    classes: tuple[str, ...]
    label_map: Mapping[int, int]
    spacing_range: SpacingRange
    fs_target_spacing: tuple[float, ...]
    patch_size: tuple[int, ...]
    channels: tuple[int, ...]
    hidden_features: tuple[int, ...]
    zscore_nonzero: bool
    image_template: str
    label_template: str
    case_pattern: str
    evaluation_ranges: Mapping[str, SpacingRange] = field(default_factory=dict)
    axcodes: str = "RAS"
    default_dir: str = ""
    split_folders: Mapping[str, str] = field(default_factory=dict)
    loss: str = "dice_ce"
    mip_weight: float = 0.0
    mip_axes: str | int | tuple[int, ...] = "all"
    mip_slab_mm: float | None = None
    mip_temperature: float | None = None
    extra_metrics: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # read-only views, so that a shared spec cannot be changed by one of its users
        object.__setattr__(self, "label_map", MappingProxyType({int(k): int(v) for k, v in self.label_map.items()}))
        object.__setattr__(self, "evaluation_ranges", MappingProxyType(dict(self.evaluation_ranges)))
        object.__setattr__(self, "split_folders", MappingProxyType(dict(self.split_folders)))
        object.__setattr__(self, "extra_metrics", tuple(self.extra_metrics))
        unknown = [k for k in self.split_folders if k not in SPLITS]
        if unknown:
            raise ValueError(f"{self.name}: split_folders names {unknown}; expected splits among {SPLITS}.")
        for template in (self.image_template, self.label_template):
            if ("{split}" in template) != bool(self.split_folders):
                raise ValueError(f"{self.name}: template {template!r} must hold '{{split}}' exactly when split_folders is given.")
        try:
            build_loss(self.loss, self.mip_weight, self.mip_axes, self.mip_slab_mm, self.mip_temperature)
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from None
        unknown = [m for m in self.extra_metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"{self.name}: extra_metrics {unknown} are not known; expected names among {sorted(METRICS)}.")
        dims = self.spacing_range.spatial_dims
        if self.classes[:1] != ("background",):
            raise ValueError(f"{self.name}: classes {self.classes} must start with 'background'.")
        bad = {k: v for k, v in self.label_map.items() if not 0 <= v < len(self.classes)}
        if bad:
            raise ValueError(f"{self.name}: label_map targets {bad} are not class indices 0..{len(self.classes) - 1}.")
        if len(self.fs_target_spacing) != dims or not self.spacing_range.contains(self.fs_target_spacing):
            raise ValueError(f"{self.name}: fs_target_spacing {self.fs_target_spacing} must lie in the spacing range {self.spacing_range}.")
        if len(self.patch_size) != dims:
            raise ValueError(f"{self.name}: patch_size {self.patch_size} needs one entry per axis ({dims}).")
        if self.modality not in self.modalities:
            raise ValueError(f"{self.name}: modality {self.modality!r} is not one of {self.modalities}.")

    @property
    def spatial_dims(self) -> int:
        return self.spacing_range.spatial_dims

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def label_names(self) -> dict[str, int]:
        """Class name -> index, the ``labels`` dict of MONAI Label apps and data list files."""
        return {name: i for i, name in enumerate(self.classes)}

    def network_kwargs(self) -> dict:
        """Keyword arguments of :class:`~custom_networks.PlainUNet` (FS / FSNR / AS baselines)."""
        return {
            "spatial_dims": self.spatial_dims,
            "in_channels": 1,
            "out_channels": self.num_classes,
            "channels": self.channels,
        }

    def hypernetwork_kwargs(self) -> dict:
        """Keyword arguments of :class:`~custom_networks.HyperUNet`: :meth:`network_kwargs` plus the MLP."""
        return {**self.network_kwargs(), "hidden_features": self.hidden_features}

    def load_transforms(self, keys: Sequence[str] = ("image", "label"), label_key: str | None = "label") -> list:
        """The deterministic loading chain every pipeline of this data set starts with.

        ``LoadImaged -> EnsureChannelFirstd -> CheckImaged -> Orientationd(axcodes) -> MapLabelsd``:
        afterwards each image is a ``(1, X, Y, Z)`` MetaTensor whose axes follow ``axcodes`` (so the
        per-axis values of this spec apply) and the label holds class indices. ``CheckImaged`` runs
        before ``Orientationd``, which cannot orient a file with a broken header.

        Args:
            keys: the keys holding file paths; the first is the reference image.
            label_key: the key whose raw label values are mapped; ``None`` (or a key not in
                ``keys``, e.g. at inference) maps nothing.
        """
        keys = list(keys)
        chain = [
            LoadImaged(keys, image_only=True),
            EnsureChannelFirstd(keys),
            CheckImaged(keys, spatial_dims=self.spatial_dims),
            Orientationd(keys, axcodes=self.axcodes, labels=None),
        ]
        if label_key is not None and label_key in keys:
            chain.append(MapLabelsd(label_key, self.label_map))
        return chain


def _filename(img) -> str:
    meta = getattr(img, "meta", None) or {}
    name = meta.get("filename_or_obj")
    return str(name) if name else "<image without a file name>"


class MapLabelsd(MapTransform):
    """Map raw label values to class indices, and refuse values the map does not know.

    MONAI's ``MapLabelValue`` leaves unknown values as they are, so a BraTS 2023 label (enhancing
    tumour 3) or an interpolated label (0.5) would pass through as a wrong class. This transform
    first checks every value present, then maps through a lookup table (one gather, instead of one
    pass over the volume per raw value: SPIDER has 77 raw values).

    Args:
        keys: label keys.
        label_map: raw value -> class index, e.g. ``get_dataset("brats").label_map``.
        dtype: output dtype (MONAI's ``LoadImaged`` default is float32 as well).
        map_key: an item may carry its own map under this key (e.g. a label drawn in 3D Slicer,
            whose values follow the segment order the user chose); it replaces ``label_map`` for
            that item and is removed from the output.

    Raises:
        ValueError: naming the file (``meta["filename_or_obj"]``), the unexpected values and the
            expected ones.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_map: Mapping[int, int],
        dtype: torch.dtype = torch.float32,
        map_key: str | None = "label_map",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.label_map = self._checked(label_map)
        self.dtype = dtype
        self.map_key = map_key

    @staticmethod
    def _checked(label_map: Mapping) -> dict[int, int]:
        if not label_map:
            raise ValueError("label_map is empty; expected raw value -> class index pairs such as {0: 0, 1: 1}.")
        raw = [float(k) for k in label_map]
        if any(not v.is_integer() for v in raw):
            raise ValueError(f"label_map keys must be integers; got {format_values(raw)}.")
        return {int(k): int(v) for k, v in label_map.items()}

    @staticmethod
    def _unexpected(label: torch.Tensor, label_map: Mapping[int, int]) -> list[float]:
        values = torch.unique(torch.as_tensor(label).detach().reshape(-1).float().cpu()).tolist()
        return [v for v in values if not (math.isfinite(v) and v.is_integer() and int(v) in label_map)]

    def unexpected_values(self, label: torch.Tensor) -> list[float]:
        """Values in ``label`` that are not keys of the map (sorted)."""
        return self._unexpected(label, self.label_map)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        item_map = d.pop(self.map_key, None) if self.map_key else None
        label_map = self._checked(item_map) if item_map is not None else self.label_map
        offset = min(label_map)
        lut = torch.zeros(max(label_map) - offset + 1, dtype=torch.int64)
        for k, v in label_map.items():
            lut[k - offset] = v
        for key in self.key_iterator(d):
            label = d[key]
            unexpected = self._unexpected(label, label_map)
            if unexpected:
                raise ValueError(
                    f"{_filename(label)}: label '{key}' has values {format_values(unexpected)} that the label map "
                    f"does not know; expected only {format_values(label_map)}. Is this the right data set "
                    "(or a resampled label, which must use nearest-neighbour interpolation)?"
                )
            src = label.as_tensor() if isinstance(label, MetaTensor) else torch.as_tensor(label)
            mapped = lut.to(src.device)[src.long() - offset].to(self.dtype)
            if isinstance(label, MetaTensor):
                mapped = MetaTensor(mapped, meta=label.meta, applied_operations=label.applied_operations)
            d[key] = mapped
        return d


def check_image(img: torch.Tensor, spatial_dims: int = 3, channels: int = 1, key: str = "image", min_size: int = MIN_SIZE) -> tuple[float, ...]:
    """Check a channel-first image as ``EnsureChannelFirstd`` leaves it; return its spacing (mm).

    Rules: the image is ``(channels, X, Y, Z)`` (one volume: a 4-D file with several volumes, e.g.
    several modalities or time points, becomes ``(C > 1, X, Y, Z)`` and is refused; a 2-D or 5-D file
    has the wrong number of dimensions), with at least ``min_size`` voxels on every axis; every voxel
    is finite (no NaN or Inf); its affine gives a spacing within
    :data:`~custom_networks.spacing.PHYSICAL_SPACING_MM` on every axis and is invertible. MONAI's
    own ``affine_to_spacing`` (and ``MetaTensor.pixdim``) report a zero spacing as 1 mm, so the raw
    affine is read here with ``suppress_zeros=False``.

    Raises:
        ValueError: naming the file (``meta["filename_or_obj"]``), the value and what was expected.
    """
    name = _filename(img)
    expected_shape = f"({channels}, {', '.join('XYZ'[:spatial_dims])})"
    if not isinstance(img, MetaTensor):
        raise ValueError(f"{name}: '{key}' is a {type(img).__name__} without an affine; load it with LoadImaged.")
    if img.dim() != spatial_dims + 1:
        raise ValueError(
            f"{name}: '{key}' has shape {tuple(img.shape)} after EnsureChannelFirstd; expected one "
            f"{spatial_dims}-D volume of shape {expected_shape}."
        )
    if img.shape[0] != channels:
        raise ValueError(
            f"{name}: '{key}' holds {img.shape[0]} volumes (shape {tuple(img.shape)} after EnsureChannelFirstd); "
            f"expected {channels}, shape {expected_shape}: give one modality per file (a 4-D file with several "
            "volumes is not a single image)."
        )
    if min(img.shape[1:]) < min_size:
        raise ValueError(
            f"{name}: '{key}' has spatial shape {tuple(img.shape[1:])}; expected at least {min_size} voxels on every "
            "axis (a network cannot segment a line or a point)."
        )
    if img.is_floating_point() and not bool(torch.isfinite(img).all()):
        bad = int((~torch.isfinite(img)).sum())
        raise ValueError(f"{name}: '{key}' has {bad} NaN or infinite voxel(s); expected finite intensities everywhere.")
    affine = img.affine.detach().cpu().to(torch.float64)
    spacing = tuple(float(s) for s in affine_to_spacing(affine, r=spatial_dims, suppress_zeros=False))
    low, high = PHYSICAL_SPACING_MM
    if any(not math.isfinite(s) or s <= 0 for s in spacing):
        raise ValueError(
            f"{name}: '{key}' has voxel spacing {list(spacing)} mm in its header (affine); expected positive, finite "
            "values on every axis. Fix the file's header (NIfTI sform/qform and pixdim, or ITK spacing)."
        )
    if any(not low <= s <= high for s in spacing):
        raise ValueError(
            f"{name}: '{key}' has voxel spacing {[round(s, 6) for s in spacing]} mm in its header; expected {low:g} to "
            f"{high:g} mm on every axis. The header is likely broken (units, pixdim): fix it before segmenting."
        )
    if abs(float(torch.linalg.det(affine[:spatial_dims, :spatial_dims]))) < 1e-12 * math.prod(spacing):
        raise ValueError(f"{name}: '{key}' has a singular affine {affine.tolist()}; its axes are not independent.")
    return spacing


class CheckImaged(MapTransform):
    """:func:`check_image` on every key, and the same spatial shape for all keys (image and label).

    Place it right after ``EnsureChannelFirstd`` so a bad file fails with its name instead of deep
    inside a later transform.

    Args:
        keys: keys to check; the first is the reference whose shape the others must have.
        spatial_dims: 3 for volumes.
        channels: channels of every key (one modality; one label map).
    """

    def __init__(self, keys: KeysCollection, spatial_dims: int = 3, channels: int = 1, min_size: int = MIN_SIZE, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = spatial_dims
        self.channels = channels
        self.min_size = int(min_size)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        ref_key = None
        for key in self.key_iterator(d):
            check_image(d[key], self.spatial_dims, self.channels, key=str(key), min_size=self.min_size)
            if ref_key is None:
                ref_key = key
            elif d[key].shape[1:] != d[ref_key].shape[1:]:
                raise ValueError(
                    f"{_filename(d[key])}: '{key}' has spatial shape {tuple(d[key].shape[1:])}, but '{ref_key}' "
                    f"({_filename(d[ref_key])}) has {tuple(d[ref_key].shape[1:])}; expected the same voxel grid."
                )
        return d


_SPIDER_CLASSES = ("background", "vertebrae", "spinal_canal")
# 1-25 vertebrae and 101-125 the same vertebrae only partly inside the field of view: both are bone,
# so both are "vertebrae" (as background they would teach the network to erase bone at the image edge)
_SPIDER_LABELS = {0: 0, **_range_map(range(1, 26), 1), **_range_map(range(101, 126), 1), 100: 2}
_SPIDER_COMMON = dict(
    modality="t1",
    modalities=("t1", "t2", "t2_SPACE"),
    spacing_range=SpacingRange((1.0, 0.2, 0.2), (5.0, 1.5, 1.5)),
    fs_target_spacing=(3.3, 0.6, 0.6),
    patch_size=(48, 128, 256),
    channels=(16, 32, 64, 128, 256),
    hidden_features=(10, 10, 20),
    zscore_nonzero=False,
    image_template="images/{case}_{modality}.mha",
    label_template="masks/{case}_{modality}.mha",
    case_pattern=r"\d+",
    default_dir="/data/SPIDER",
    evaluation_ranges={
        "wide": SpacingRange((1.0, 0.2, 0.2), (5.0, 1.5, 1.5)),
        "narrow": SpacingRange((3.0, 0.4, 0.4), (3.5, 0.8, 0.8)),
    },
)

DATASETS: Mapping[str, DatasetSpec] = MappingProxyType(
    {
        "brats": DatasetSpec(
            name="brats",
            description="BraTS 2021: tumour core (necrosis + enhancing tumour) from T1-CE brain MR, 1 mm",
            modality="t1ce",
            modalities=("t1", "t1ce", "t2", "flair"),
            classes=("background", "tumour_core"),
            # 1 necrosis and 4 enhancing tumour form the tumour core; 2 edema is not core
            label_map={0: 0, 1: 1, 2: 0, 4: 1},
            spacing_range=SpacingRange((1.0, 1.0, 1.0), (3.0, 3.0, 3.0)),
            fs_target_spacing=(1.0, 1.0, 1.0),
            patch_size=(128, 128, 128),
            channels=(16, 32, 64, 128),
            hidden_features=(10, 10, 50),
            zscore_nonzero=True,
            image_template="{case}/{case}_{modality}.nii.gz",
            label_template="{case}/{case}_seg.nii.gz",
            case_pattern=r"BraTS2021_\d+",
            default_dir="/data/BraTS2021",
            evaluation_ranges={
                "wide": SpacingRange((0.5, 0.5, 0.5), (3.5, 3.5, 3.5)),
                "narrow": SpacingRange((0.8, 0.8, 0.8), (1.2, 1.2, 1.2)),
            },
        ),
        "spider": DatasetSpec(
            name="spider",
            description="SPIDER: vertebrae and spinal canal from sagittal lumbar spine MR (T1), thick slices",
            classes=_SPIDER_CLASSES,
            # intervertebral discs 201-225 are background in the paper's task
            label_map={**_SPIDER_LABELS, **_range_map(range(201, 226), 0)},
            **_SPIDER_COMMON,
        ),
        "spider_discs": DatasetSpec(
            name="spider_discs",
            description="SPIDER with discs: vertebrae, spinal canal and intervertebral discs from sagittal lumbar MR",
            classes=_SPIDER_CLASSES + ("intervertebral_discs",),
            label_map={**_SPIDER_LABELS, **_range_map(range(201, 226), 3)},
            **_SPIDER_COMMON,
        ),
        "mmwhs": DatasetSpec(
            name="mmwhs",
            description="MM-WHS MR: seven cardiac structures from whole-heart MR",
            modality="mr",
            modalities=("mr",),
            classes=(
                "background",
                "lv_myocardium",
                "left_atrium",
                "lv_cavity",
                "right_atrium",
                "right_ventricle",
                "ascending_aorta",
                "pulmonary_artery",
            ),
            # 421 is a left-atrium label that a few MM-WHS files carry besides 420
            label_map={0: 0, 205: 1, 420: 2, 421: 2, 500: 3, 550: 4, 600: 5, 820: 6, 850: 7},
            spacing_range=SpacingRange((0.5, 0.5, 0.5), (3.5, 3.5, 3.5)),
            fs_target_spacing=(0.9, 0.9, 1.2),
            patch_size=(128, 128, 128),
            channels=(16, 32, 64, 128),
            hidden_features=(10, 10, 50),
            zscore_nonzero=False,
            image_template="mr_train/mr_train_{case}_image.nii.gz",
            label_template="mr_train/mr_train_{case}_label.nii.gz",
            case_pattern=r"\d+",
            default_dir="/data/MM-WHS",
            evaluation_ranges={
                "wide": SpacingRange((0.5, 0.5, 0.5), (3.5, 3.5, 3.5)),
                "narrow": SpacingRange((0.7, 0.7, 1.0), (1.1, 1.1, 1.4)),
            },
        ),
        "vessel": DatasetSpec(
            name="vessel",
            description="Vessels from 7T time-of-flight MR angiography (SMILE-UHURA / StudyForrest layout), about 0.3 mm",
            modality="tof",
            modalities=("tof",),
            classes=("background", "vessel"),
            label_map={0: 0, 1: 1},
            # 7T ToF is acquired at about 0.3 mm isotropic: finer has no data behind it. Up to 1 mm
            # per axis covers the clinical 1.5T / 3T ToF slice thicknesses and a working grid 37x
            # smaller than the native one, while the larger vessels (radius >= 0.5 mm) stay at least
            # one voxel wide; the thinnest (0.15-0.3 mm) are lost there whatever the model
            spacing_range=SpacingRange((0.3, 0.3, 0.3), (1.0, 1.0, 1.0)),
            fs_target_spacing=(0.3, 0.3, 0.3),
            patch_size=(64, 64, 64),  # SPOCKMIP's patch
            channels=(16, 32, 64, 128),
            hidden_features=(10, 10, 50),
            zscore_nonzero=False,  # ToF MRA is not skull-stripped: its background noise is data
            # image and label share the file name; .nii and .nii.gz both occur
            image_template="{split}/{case}",
            label_template="{split}_label/{case}",
            case_pattern=r"[^/]+\.nii(?:\.gz)?",
            split_folders={"training": "train", "validation": "validate", "test": "test"},
            default_dir="/data/SMILE-UHURA",
            evaluation_ranges={
                "wide": SpacingRange((0.3, 0.3, 0.3), (1.0, 1.0, 1.0)),
                "narrow": SpacingRange((0.3, 0.3, 0.3), (0.4, 0.4, 0.4)),  # near the native 0.3 mm
            },
            # SPOCKMIP: focal Tversky 0.7 + MIP focal Tversky 0.3, its better multi-axis variant
            # (the three full-patch MIPs summed), hard maximum
            loss="focal_tversky",
            mip_weight=0.3,
            mip_axes="all",
            extra_metrics=("cldice", "components", "extra_components"),
        ),
    }
)


def get_dataset(name: str | DatasetSpec) -> DatasetSpec:
    """The :class:`DatasetSpec` registered as ``name`` (a spec is returned as it is).

    SPIDER has two entries: ``"spider"`` (the paper's task: vertebrae, spinal canal; discs are
    background) and ``"spider_discs"`` (discs as class 3). Separate keys, so that a bundle config names
    its task with one string.

    Raises:
        ValueError: for an unknown name, listing the valid ones.
    """
    if isinstance(name, DatasetSpec):
        return name
    key = str(name).strip().lower()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}.")
    return DATASETS[key]
