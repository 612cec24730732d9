from pathlib import Path

from setuptools import setup


setup(
    name="hf-moe",
    version="0.1.0",
    description="Mixture-of-experts models built from dense checkpoints, native to the Hugging Face stack",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "hf_moe",
        "hf_moe.clip_moe",
        "hf_moe.we_moe",
        "hf_moe.moiie",
        "hf_moe.mode",
        "hf_moe.modeling",
        "hf_moe.conversion",
        "hf_moe.metrics",
        "hf_moe.class_names",
    ],
    package_data={"hf_moe": ["suites/*.yaml"], "hf_moe.metrics": ["*/*.py"], "hf_moe.class_names": ["*.json"]},
    package_dir={"hf_moe": "hf_moe", "hf_moe.modeling": "modeling", "hf_moe.conversion": "conversion"},
    install_requires=[
        "torch>=2.6",
        "transformers>=5.0",
        "accelerate>=1.4",
        "peft>=0.15",
        "safetensors>=0.5",
        "huggingface_hub>=1.0",
        "datasets>=3.0",
        "evaluate>=0.4",
        "pillow>=10",
        "numpy>=1.26",
    ],
    extras_require={
        "analysis": ["matplotlib>=3.7"],  # hf-moe analyze-routing's figures
        "bench": ["faiss-cpu>=1.8", "scikit-learn>=1.3"],
        "deepspeed": ["deepspeed>=0.16"],
        "demo": ["scikit-learn>=1.3", "matplotlib>=3.7"],
        "test": [
            "pytest>=8",
            "parameterized>=0.9",
            "scikit-learn>=1.3",
            "matplotlib>=3.7",
            "deepspeed>=0.19,<0.20",
            "onnx>=1.17",
            "onnxscript>=0.3",
            "onnxruntime>=1.20",
            "bitsandbytes>=0.48",
        ],
    },
    entry_points={"console_scripts": ["hf-moe=hf_moe.cli:main"]},
)
