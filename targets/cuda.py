"""CUDA targets: Ampere (sm_80) and Hopper (sm_90). Registered, with no pipeline or schedule rules
yet: ``lowbit targets`` lists them as unable to build, and a compile for them stops before any work."""

from .registry import ChipTarget, register_target

CUDA_SM80 = register_target(
    ChipTarget(
        name="cuda-sm80",
        family="cuda",
        tvm_target={"kind": "cuda", "arch": "sm_80", "host": {"kind": "llvm"}},
        capabilities=("dp4a", "mma_i8"),
        description="NVIDIA Ampere (A100, A10, RTX 30xx)",
    )
)

CUDA_SM90 = register_target(
    ChipTarget(
        name="cuda-sm90",
        family="cuda",
        tvm_target={"kind": "cuda", "arch": "sm_90", "host": {"kind": "llvm"}},
        capabilities=("dp4a", "mma_i8", "wgmma"),
        description="NVIDIA Hopper (H100, H200)",
    )
)
