"""minicirc: sparse feature circuits, a minimal reference implementation.

Install with `pip install --no-build-isolation -e .` after `pip install torch==2.13.0` (or your own
torch build): the C++ extension compiles against the torch that is already installed.

Extension build (csrc/, LibTorch stable ABI, torch >= 2.10):
- minicirc._C (CPU kernels + op schemas) is built everywhere; MINICIRC_NO_BUILD_EXT=1 skips it.
- minicirc._C_cuda is built only where torch has CUDA, a GPU is visible and a toolkit is found, or
  with FORCE_CUDA=1 (wheels on GPU-less CI). Its build is optional: a failure there only warns.
Without the extension minicirc runs its torch reference path (minicirc/ops.py).
"""
import os
import sys

from setuptools import find_packages, setup

# 2.10.0 in the stable ABI's version encoding: expose only the API that exists since 2.10.
TORCH_TARGET_VERSION = "-DTORCH_TARGET_VERSION=0x020a000000000000"


def _want_cuda(torch, cuda_home):
    if os.getenv("USE_CUDA", "1") == "0" or not torch.version.cuda or cuda_home is None:
        return False
    return os.getenv("FORCE_CUDA", "0") == "1" or torch.cuda.is_available()


def extension_modules():
    """The optional C++/CUDA extension (csrc/). Returns [] where nothing can be built."""
    if os.getenv("MINICIRC_NO_BUILD_EXT", "0") == "1":
        return []
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension
    except ImportError:  # metadata-only runs (e.g. an isolated build without torch)
        return []
    if tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < (2, 10):
        print("minicirc: torch < 2.10 has no stable ABI; skipping the extension", file=sys.stderr)
        return []
    debug = os.getenv("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    here = os.path.dirname(os.path.abspath(__file__))
    # The headers both libraries include (argument checks, the rows walk): a change rebuilds both.
    depends = [os.path.join("csrc", h) for h in ("minicirc_checks.h", "minicirc_rows.h")]
    exts = [
        CppExtension(
            "minicirc._C",
            [os.path.join("csrc", "minicirc_cpu.cpp")],
            depends=depends,
            # -fopenmp-simd honours `omp simd` reductions without linking an OpenMP runtime.
            extra_compile_args={"cxx": opt + ["-fopenmp-simd", TORCH_TARGET_VERSION]},
            py_limited_api=True,
        )
    ]
    if _want_cuda(torch, CUDA_HOME) and os.path.exists(os.path.join(here, "csrc", "minicirc_cuda.cu")):
        try:
            exts.append(
                CUDAExtension(
                    "minicirc._C_cuda",
                    [os.path.join("csrc", "minicirc_cuda.cu")],
                    depends=depends,
                    extra_compile_args={
                        "cxx": opt + [TORCH_TARGET_VERSION],
                        # USE_CUDA declares aoti_torch_get_current_cuda_stream in the stable shim.
                        "nvcc": opt[:1] + [TORCH_TARGET_VERSION, "-DUSE_CUDA", "--expt-relaxed-constexpr"],
                    },
                    py_limited_api=True,
                )
            )
        except Exception as e:  # noqa: BLE001 - a broken toolkit must not break the install
            print(f"minicirc: WARNING: CUDA extension skipped ({e})", file=sys.stderr)
    return exts


def build_commands():
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        return {}

    class BuildExt(BuildExtension):
        """BuildExtension that lets the CUDA library fail without failing the install."""

        def build_extension(self, ext):
            if not ext.name.endswith("_C_cuda"):
                return super().build_extension(ext)
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - any toolkit/compiler problem
                print(f"minicirc: WARNING: CUDA extension not built ({e}); CUDA inputs will use "
                      "the torch reference path", file=sys.stderr)

    return {"build_ext": BuildExt}


def wheel_options():
    # The extension only uses the limited Python API and the stable torch ABI: one abi3 wheel.
    return {"bdist_wheel": {"py_limited_api": "cp39"}} if extension_modules() else {}


setup(
    name="minicirc",
    version="0.1.0",
    description="Sparse feature circuits: a minimal pure-torch reference with a fused C++/CUDA extension",
    packages=find_packages(include=["minicirc", "minicirc.*"]),
    # viewer_files: the pages circuit.html and graph.html (skeleton, headers, CSS and scripts); default_files:
    # the embedded default model, tokenizer and SAEs (safetensors + json, a few MB); sae_recipes.json: the SAE
    # recipes measured on SmolLM2; tasks/novel_agreement.json: the agreement prompts with words the templates
    # never use.
    package_data={"minicirc": ["viewer_files/*"],
                  "minicirc.experiments": ["default_files/*", "default_files/*/*", "default_files/*/*/*",
                                           "sae_recipes.json"],
                  "minicirc.experiments.tasks": ["novel_agreement.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "tokenizers",
        "tqdm",
        "matplotlib",
    ],
    # gguf: reading llama-architecture .gguf files; the tests also load them with transformers (+ accelerate).
    # hub: --model / --saes as Hugging Face Hub ids (huggingface_hub needs no torch).
    extras_require={"gguf": ["gguf"], "hub": ["huggingface_hub"],
                    "test": ["pytest", "transformers", "gguf", "accelerate", "huggingface_hub"]},
    entry_points={"console_scripts": ["minicirc=minicirc.cli:main"]},
    ext_modules=extension_modules(),
    cmdclass=build_commands(),
    options=wheel_options(),
)
