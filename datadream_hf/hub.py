"""Pushes an output folder to the Hugging Face Hub (the one call tests replace, the Hub being unreachable here)."""

from __future__ import annotations

import os

from huggingface_hub import HfApi


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    repo_type: str = "model",
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload with datadream_hf",
    ignore_patterns: list[str] | None = None,
) -> str:
    """Creates `repo_id` if needed and uploads `folder`; checkpoints and temp files stay local. Returns the URL."""
    api = HfApi(token=token)
    url = api.create_repo(repo_id=repo_id, repo_type=repo_type, private=private, exist_ok=True)
    api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type=repo_type,
        commit_message=commit_message,
        ignore_patterns=["checkpoint-*", "checkpoint-*/**", "*.tmp", ".*", "*.lock"] + list(ignore_patterns or []),
    )
    return str(url)
