"""Uploading a finished, verified folder to the Hugging Face Hub (`--push-to-hub`)."""

from typing import Optional


def push_folder(folder: str, repo_id: str, private: bool, token: Optional[str]) -> str:
    """Upload a finished folder (weights, code, processor, card) in one commit."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, token=token)
    api.upload_folder(folder_path=folder, repo_id=repo_id, token=token, commit_message="Add QMoP-LLaVA converted from LLaVA-1.5")
    print(f"pushed {folder} to {repo_id}", flush=True)
    return repo_id
