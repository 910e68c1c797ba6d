"""Verified export of deployed models: the ``deployed.pt`` file format (:mod:`.deployed`),
``torch.export`` / ONNX / TorchScript files (:mod:`.formats`), and the checks and
measurements that come before writing (:mod:`.checks`).

Users of RepVGG, MobileOne and DBB most often report "outputs differ after deploy" and "ONNX
export fails". Everything here checks before it writes: :func:`verify` measures the largest
relative difference between training and deployed forms (TF32 off), ``deployed.pt`` stores
each convolution's geometry and is refused when its ``arch`` rebuilds anything else, and
every file is written atomically (:mod:`repsqueeze.files`).
"""

from repsqueeze.export.checks import (
    check_weights,
    count_macs,
    count_params,
    has_blocks,
    max_abs_diff,
    relative_error,
    verify,
)
from repsqueeze.export.deployed import (
    FORMAT,
    FORMAT_WITHOUT_GEOMETRY,
    GEOMETRY_FIELDS,
    conv_geometry,
    geometry_mismatch,
    load_deployed,
    save_deployed,
    state_dict_mismatch,
)
from repsqueeze.export.formats import (
    ONNX_HINT,
    ONNX_MODULES,
    export_program,
    load_pt2,
    onnx_session,
    require_onnx,
    run_onnx,
    to_onnx,
    to_pt2,
    to_torchscript,
)
from repsqueeze.files import atomic_path, save_atomic

__all__ = [
    "FORMAT",
    "FORMAT_WITHOUT_GEOMETRY",
    "GEOMETRY_FIELDS",
    "ONNX_HINT",
    "ONNX_MODULES",
    "atomic_path",
    "check_weights",
    "conv_geometry",
    "count_macs",
    "count_params",
    "export_program",
    "geometry_mismatch",
    "has_blocks",
    "load_deployed",
    "load_pt2",
    "max_abs_diff",
    "onnx_session",
    "relative_error",
    "require_onnx",
    "run_onnx",
    "save_atomic",
    "save_deployed",
    "state_dict_mismatch",
    "to_onnx",
    "to_pt2",
    "to_torchscript",
    "verify",
]
