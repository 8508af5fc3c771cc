from typing import Any, Literal, Optional

import numpy.typing as npt

__version__: str
CUDA_BUILD_NOTE: str
JAX_BUILD_NOTE: str


def group_norm(
    input: npt.ArrayLike,
    num_groups: int,
    weight: Optional[npt.ArrayLike] = ...,
    bias: Optional[npt.ArrayLike] = ...,
    eps: float = ...,
    *,
    activation: Optional[Literal["silu"]] = ...,
    channel_axis: int = ...,
    out: Optional[npt.NDArray[Any]] = ...,
    stream: Any = ...,
) -> npt.NDArray[Any]: ...
def group_norm_forward(
    input: npt.ArrayLike,
    num_groups: int,
    weight: Optional[npt.ArrayLike] = ...,
    bias: Optional[npt.ArrayLike] = ...,
    eps: float = ...,
    *,
    activation: Optional[Literal["silu"]] = ...,
    stream: Any = ...,
) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]: ...
def group_norm_backward(
    grad_output: npt.ArrayLike,
    input: npt.ArrayLike,
    mean: npt.ArrayLike,
    rstd: npt.ArrayLike,
    num_groups: int,
    weight: Optional[npt.ArrayLike] = ...,
    *,
    bias: Optional[npt.ArrayLike] = ...,
    activation: Optional[Literal["silu"]] = ...,
    stream: Any = ...,
) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]: ...
def get_num_threads() -> int: ...
def set_num_threads(n: Optional[int]) -> None: ...
def fork_serial() -> bool: ...
def set_isa(name: Literal["scalar", "avx2", "avx512", "avx512_bf16", "neon"]) -> None: ...
def get_isa() -> str: ...
def compiled_isas() -> list[str]: ...
def supported_isas() -> list[str]: ...
def openmp() -> bool: ...
def _result_pool() -> tuple[int, int]: ...
def _cpu_entry_points() -> tuple[int, int]: ...
