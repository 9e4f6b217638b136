"""Train QMoP-LLaVA (stage 1: projector; stage 2: projector + LLM, full / LoRA / QLoRA).

    python scripts/train_qmop.py --model_name_or_path CKPT --stage 1 --data_path data.json \
        --image_folder images --output_dir out --per_device_train_batch_size 32 --learning_rate 1e-3 ...

All logic lives in qmop_tools.train (see docs/training.md); this file only parses arguments. Every
transformers.TrainingArguments flag is accepted; a single .json/.yaml argument is read as the whole configuration.
"""

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from qmop_tools.train import main  # noqa: E402

if __name__ == "__main__":
    main()
