"""The Hugging Face Hub upload of an output folder: `check_push_access` before any model loads (as diffusers' scripts
create the repo before training), `push_folder_to_hub` after the run. These and the dataset upload are the only Hub
writes, and the calls tests replace, the Hub being unreachable here."""

from __future__ import annotations

import os

from huggingface_hub import HfApi, get_token, is_offline_mode
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import HFValidationError, get_session, validate_repo_id

from .errors import InputError, one_line

REACH_TIMEOUT_S = 10  # the reachability probe's limit: an unreachable Hub is refused in seconds, not after retries


class HubAccessError(InputError):
    """A `--push_to_hub` that could not upload: offline, no token, the Hub unreachable, or no write access."""


def check_push_access(
    repo_id: str,
    token: str | None = None,
    repo_type: str = "model",
    private: bool = False,
    flag: str = "--push_to_hub",
    main_process: bool = True,
) -> str | None:
    """Checks, before any work, that the run's upload to `repo_id` can succeed, and creates the repo (as
    `push_folder_to_hub` would); returns its URL. Raises `HubAccessError` naming what to do: offline mode, no token,
    an invalid repo id (checked on every process), the Hub unreachable, a token it refuses or a read-only one, a
    namespace the token's user cannot write to, a repo it may not create (checked on the main process only: the others
    return None; a failing main process ends the launch).

    Args:
        repo_id: `name` (the token's user's namespace) or `owner/name`.
        token: the token to use (default: the logged-in one, or `HF_TOKEN`).
        flag: how the user asked for the upload, for the messages.
    """
    later = f"drop {flag} and upload the output folder later (`hf upload {repo_id} <output_dir>`)"
    if is_offline_mode():
        raise HubAccessError(
            f"{flag}: the Hub is offline (HF_HUB_OFFLINE=1), so the upload to {repo_id!r} would fail after the run. "
            f"Unset HF_HUB_OFFLINE, or {later}."
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise HubAccessError(f"{flag}: {repo_id!r} is not a Hub repo id ({one_line(err)}).") from None
    token = token or get_token()
    if not token:
        raise HubAccessError(
            f"{flag}: no Hugging Face token, so the upload to {repo_id!r} would fail after the run. Log in with "
            f"`hf auth login` (or set HF_TOKEN, or pass --hub_token), or {later}."
        )
    if not main_process:
        return None
    endpoint = hub_constants.ENDPOINT
    try:
        get_session().head(endpoint, timeout=REACH_TIMEOUT_S)
    except Exception as err:  # httpx raises several unrelated types for a network that does not answer
        raise HubAccessError(
            f"{flag}: the Hub ({endpoint}) cannot be reached ({one_line(err)}). Check the network or proxy, or "
            f"{later}."
        ) from None
    api = HfApi(token=token)
    try:
        user = api.whoami()
    except HfHubHTTPError as err:
        raise HubAccessError(
            f"{flag}: the Hub refused the token ({one_line(err)}). Log in again with `hf auth login --force` or pass "
            "a valid --hub_token."
        ) from None
    role = ((user.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise HubAccessError(
            f"{flag}: the token of {user.get('name')!r} is read-only, so it cannot upload to {repo_id!r}. Create a "
            "token with write access (https://huggingface.co/settings/tokens) and log in with it."
        )
    name, orgs = user.get("name"), [org.get("name") for org in user.get("orgs") or []]
    if "/" in repo_id and repo_id.split("/")[0] not in [name, *orgs]:
        raise HubAccessError(
            f"{flag}: {repo_id!r} is in the namespace {repo_id.split('/')[0]!r}, but the token belongs to {name!r} "
            f"(organizations: {', '.join(orgs) or 'none'}), who cannot write there. Pass a repo id under {name!r}."
        )
    try:
        url = api.create_repo(repo_id=repo_id, repo_type=repo_type, private=private, exist_ok=True)
    except HfHubHTTPError as err:
        raise HubAccessError(
            f"{flag}: {name!r} cannot create or write the {repo_type} repo {repo_id!r} "
            f"({one_line(err)}). Pass a repo id you can write to."
        ) from None
    return str(url)


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
