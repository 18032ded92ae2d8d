"""`--push_to_hub` is checked before any work (token, reachability, write access, the repo created), so an upload that
cannot happen is refused in seconds with one line and nothing written, by each of the three stages. Only the Hub calls
themselves are replaced (`reachable_hub` in conftest.py); offline mode is the real one."""

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub.errors import HfHubHTTPError

from datadream_hf.hub import HubAccessError, check_push_access
from datadream_hf.run_folder import LOCK_NAME
from datadream_hf.testing import write_fake_stage1_output

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "training_scripts"


def stage_argv(stage: str, paths: dict, output_dir: Path) -> list[str]:
    """A small run of `stage` with `--push_to_hub`."""
    if stage == "stage1":
        return [str(SCRIPTS / "train_datadream_lora.py"), "--pretrained_model_name_or_path", paths["sd"], "--dataset",
                paths["digits"], "--few_shot_manifest", paths["manifest"], "--output_dir", str(output_dir),
                "--resolution", "32", "--max_train_steps", "1", "--report_to", "none", "--push_to_hub",
                "--hub_model_id", "u/adapters"]  # fmt: skip
    if stage == "stage2":
        return [str(SCRIPTS / "generate_synthetic.py"), "--pretrained_model_name_or_path", paths["sd"],
                "--adapter_path", paths["adapters"], "--output_dir", str(output_dir), "--images_per_class", "2",
                "--num_inference_steps", "2", "--push_to_hub", "--hub_dataset_id", "u/synthetic"]  # fmt: skip
    return [str(SCRIPTS / "train_classifier.py"), "--model_name_or_path", paths["clip"], "--real_dataset",
            paths["digits"], "--few_shot_manifest", paths["manifest"], "--train_mode", "real", "--output_dir",
            str(output_dir), "--max_steps", "1", "--report_to", "none", "--push_to_hub", "--hub_model_id",
            "u/classifier"]  # fmt: skip


@pytest.fixture(scope="module")
def paths(tiny_sd_path, tiny_clip_path, digits_path, digits_manifest_path, tmp_path_factory):
    adapters = tmp_path_factory.mktemp("hub") / "adapters"
    write_fake_stage1_output(adapters, tiny_sd_path, ["zero", "one"], seed=0)
    return {"sd": str(tiny_sd_path), "clip": str(tiny_clip_path), "digits": digits_path,
            "manifest": digits_manifest_path, "adapters": str(adapters)}  # fmt: skip


def written(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.name != LOCK_NAME] if folder.exists() else []


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
def test_push_to_hub_offline_is_refused_at_once_with_one_line_and_nothing_written(stage, paths, tmp_path):
    output_dir = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    result = subprocess.run([sys.executable, *stage_argv(stage, paths, output_dir)], env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--push_to_hub: the Hub is offline (HF_HUB_OFFLINE=1)" in lines[0], result.stderr
    assert "Unset HF_HUB_OFFLINE, or drop --push_to_hub" in lines[0]
    assert not written(output_dir), written(output_dir)
    # Refused after the imports, before any model or data: seconds of CPU. (Wall time on a machine shared with other
    # jobs runs several times longer, so the 15 s bound is on the process's own CPU time.)
    assert cpu < 15, f"{cpu:.1f} s of CPU ({wall:.1f} s wall)"


@pytest.fixture
def no_work(monkeypatch):
    """Every model load and data load fails loudly: a refused upload must come before any of them."""
    import datadream_hf.adapt.train
    import datadream_hf.classify.train
    import datadream_hf.generate.run

    def expensive(*args, **kwargs):
        raise AssertionError("work started before the upload was checked")

    monkeypatch.setattr(datadream_hf.adapt.train, "load_generator_models", expensive)
    monkeypatch.setattr(datadream_hf.generate.run, "load_generation_pipeline", expensive)
    monkeypatch.setattr(datadream_hf.classify.train, "load_classifier_data", expensive)
    monkeypatch.setattr(datadream_hf.classify.train, "load_classifier", expensive)


def _load_script(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
def test_a_read_only_token_is_refused_before_any_work_by_every_stage(stage, paths, tmp_path, reachable_hub, no_work):
    reachable_hub.user["auth"]["accessToken"]["role"] = "read"
    script, *argv = stage_argv(stage, paths, tmp_path / "out")
    module = _load_script(Path(script))
    with pytest.raises(HubAccessError, match=r"--push_to_hub: the token of 'user' is read-only.*write access"):
        module.main(module.parse_args(argv))
    assert [call[0] for call in reachable_hub.calls] == ["head", "whoami"]
    assert not written(tmp_path / "out")


def _http_error(status: int, message: str) -> HfHubHTTPError:
    import httpx2

    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    return HfHubHTTPError(message, response=httpx2.Response(status, request=request))


def _refuse(name):
    def raise_error(*args, **kwargs):
        raise {"whoami": _http_error(401, "Invalid user token."),
               "create_repo": _http_error(403, "You don't have the rights to create a model under this namespace"),
               "head": ConnectionError("[Errno 101] Network is unreachable")}[name]  # fmt: skip

    return raise_error


CASES = {
    # name: (what changes, the repo id, the message's pattern)
    "no token": (lambda hub, mp: mp.delenv("HF_TOKEN") or mp.setattr("datadream_hf.hub.get_token", lambda: None),
                 "user/x", r"no Hugging Face token.*`hf auth login` \(or set HF_TOKEN, or pass --hub_token\)"),
    "Hub unreachable": (lambda hub, mp: mp.setattr("datadream_hf.hub.get_session", lambda: type(
        "S", (), {"head": _refuse("head")})()), "user/x", r"the Hub \(https?://.*\) cannot be reached "
                                                           r"\(\[Errno 101\] Network is unreachable\)"),
    "invalid token": (lambda hub, mp: mp.setattr(huggingface_hub.HfApi, "whoami", _refuse("whoami")), "user/x",
                      r"the Hub refused the token \(Invalid user token.\).*hf auth login --force"),
    "another user's namespace": (lambda hub, mp: None, "stranger/x",
                                 r"'stranger/x' is in the namespace 'stranger', but the token belongs to 'user' "
                                 r"\(organizations: u, someone\).*Pass a repo id under 'user'"),
    "no right to create the repo": (lambda hub, mp: mp.setattr(huggingface_hub.HfApi, "create_repo",
                                                               _refuse("create_repo")), "u/x",
                                    r"'user' cannot create or write the model repo 'u/x' \(You don't have the rights"),
    "not a repo id": (lambda hub, mp: None, "a/b/c", r"'a/b/c' is not a Hub repo id"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_each_reason_an_upload_would_fail_is_named(name, reachable_hub, monkeypatch):
    change, repo_id, match = CASES[name]
    change(reachable_hub, monkeypatch)
    with pytest.raises(HubAccessError, match=match):
        check_push_access(repo_id)
    assert "create_repo" not in [call[0] for call in reachable_hub.calls]


def test_a_writable_repo_is_created_before_the_run_and_other_processes_make_no_hub_call(reachable_hub):
    url = check_push_access("someone/adapters", "hf_token_passed", repo_type="dataset", private=True)
    assert url == "https://huggingface.co/datasets/someone/adapters"
    assert reachable_hub.calls == [("head", huggingface_hub.constants.ENDPOINT), ("whoami", "hf_token_passed"),
                                   ("create_repo", "someone/adapters", "dataset", True)]  # fmt: skip
    assert check_push_access("someone/adapters", main_process=False) is None and len(reachable_hub.calls) == 3
