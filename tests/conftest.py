"""Shared fixtures: tiny offline models written once per session, the bundled digits and a K-shot manifest."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: needs real model weights or a GPU; skipped by default")


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    from datadream_hf.testing import save_tiny_stable_diffusion

    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory):
    from datadream_hf.testing import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("models") / "tiny-clip")


@pytest.fixture(scope="session")
def digits():
    from datadream_hf.tiny_world.digits import load_digits_dataset

    return load_digits_dataset()


@pytest.fixture(scope="session")
def digits_path(digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "digits"
    digits.save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="session")
def digits_manifest_path(digits, tmp_path_factory):
    """A K=4 manifest over the digits train split (small K keeps stage tests fast)."""
    from datadream_hf.few_shot import draw_few_shot

    path = tmp_path_factory.mktemp("manifest") / "few_shot.json"
    draw_few_shot(digits["train"], k=4, seed=0, source_name="digits", split="train").save(path)
    return str(path)


@pytest.fixture
def reachable_hub(monkeypatch):
    """The Hub as `datadream_hf.hub.check_push_access` sees it when it is reachable and the token may write (user
    `user`, member of `u` and `someone`): online mode, and the Hub calls themselves (the reachability probe,
    `HfApi.whoami`, `HfApi.create_repo`) replaced; `calls` records them in order, `user` is what whoami answers."""
    from types import SimpleNamespace

    import huggingface_hub

    import datadream_hf.hub

    calls = []
    user = {"name": "user", "orgs": [{"name": "u"}, {"name": "someone"}], "auth": {"accessToken": {"role": "write"}}}

    class Session:
        def head(self, url, timeout=None):
            calls.append(("head", url))

    def whoami(self, *args, **kwargs):
        calls.append(("whoami", self.token))
        return user

    def create_repo(self, repo_id, repo_type=None, private=False, exist_ok=False, **kwargs):
        calls.append(("create_repo", repo_id, repo_type, private))
        return f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_logged_in_token_of_the_fake_hub")
    monkeypatch.setattr(datadream_hf.hub, "get_session", Session)
    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", whoami)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    return SimpleNamespace(calls=calls, user=user)
