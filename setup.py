"""sdim-tf: Supervised Deep InfoMax in TensorFlow/Keras, and a pipeline to a SavedModel."""

from setuptools import find_packages, setup

setup(
    name="sdim-tf",
    version="0.1.0",
    description="Supervised Deep InfoMax: a generative classifier that rejects illegal inputs.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sdim_tf", "sdim_tf.*", "pipeline", "pipeline.*"]),
    # Ranges shown to work together on this project's machines (TF 2.21 + Keras 3 + tfp 0.25).
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.12",
        "tf-keras>=2.21,<2.22",  # tensorflow-probability imports it
        "tensorflow-probability>=0.25,<0.26",
        "tensorflow-datasets>=4.9",
        "importlib_resources",  # tfds imports it without declaring it on Python 3.11
        "tf-keras-vis>=0.8.7",
        "absl-py>=2.0",
        "matplotlib>=3.7",
        "tensorboard>=2.20",  # TF 2.21 no longer installs it; Keras' TensorBoard callback needs it
        "tensorflow-serving-api>=2.21,<2.22",
        "numpy",
        "Pillow",  # image headers of your own folders (sdim_tf.data.images)
        "scipy",
        "tqdm",  # pipeline.predict's progress bar
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "ruff>=0.6", "Pillow",
                 "adversarial-robustness-toolbox>=1.18",
                 "hypothesis>=6.100",  # bench/fuzz_signatures.py
                 "apache-beam[tfrecord]>=2.78", "google-crc32c"],  # test_ingest_beam, test_predict
        "attacks": ["adversarial-robustness-toolbox>=1.18"],
        # The Beam drivers of ingest (sdim_tf.data.beam) and pipeline.predict
        # (pipeline.predict_beam); [tfrecord] brings the CRC32C library
        # WriteToTFRecord needs, google-crc32c its fast implementation.
        "beam": ["apache-beam[tfrecord]>=2.78", "google-crc32c"],
        # bench.peer's driver of the authors' PyTorch SDIM in this environment (its default
        # --peer_python). Install torch's CPU wheel first (pip install torch --index-url
        # https://download.pytorch.org/whl/cpu): PyPI's Linux wheel is the CUDA build.
        "peer": ["torch>=2.1"],
        # CUDA and cuDNN wheels for TensorFlow on Linux GPUs (not tested here: no GPU).
        "gpu": ["tensorflow[and-cuda]>=2.21,<2.22"],
    },
)
