from setuptools import setup

setup(
    name="dali-deepspeed-vision",
    version="0.1.0",
    description="Train Hugging Face vision models on WebDataset shards: DALI input, DeepSpeed ZeRO, W&B",
    python_requires=">=3.11",
    packages=["pipelines", "train"],
    install_requires=[
        # The ranges are the versions this project is tested with.
        "torch>=2.13,<2.14",
        "nvidia-dali-cuda120>=2.4,<2.5",
        "deepspeed>=0.19.8,<0.20",
        "transformers>=5.24,<6",
        "webdataset>=1.0.2,<1.1",
        "wandb>=0.31,<0.32",
        "numpy>=2.0",
        "Pillow>=12.0,<14",
        "tqdm>=4.66",
        "psutil>=5.9",  # the trainer watches its launcher
        "scikit-learn>=1.9,<2",  # the built-in digits dataset
    ],
    extras_require={
        "datasets": ["datasets>=5.2,<6"],  # make_shards reads Hugging Face datasets
        "test": ["pytest>=9,<10", "pytest-xdist>=3.8,<4", "scikit-image>=0.26,<0.27", "datasets>=5.2,<6"],
    },
)
