"""Preemption, exact resume after SIGTERM, atomic checkpoints, unreadable images, two nodes on
127.0.0.1, and a dead peer.

Method runs use the synthetic image folder (26 training images of 32 px) with a global batch of 8
and --workers 0, so the augmentation draws from the main process's random state, which the
checkpoint stores.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
from conftest import REPO_ROOT, SCRIPT_TIMEOUT_S, describe_failure, free_port, read_metrics, run_script, script_env

RUN_ARGS = ("--dataset", "folder", "--arch", "resnet18", "--batch-size", "8", "--workers", "0",
            "--knn-every", "0", "--log-every", "1", "--checkpoint-every", "100")
METHOD_ARGS = {
    "simclr.py": ("--epochs", "4", "--warmup-epochs", "1"),
    "dcl.py": ("--epochs", "4", "--warmup-epochs", "1"),
    "moco.py": ("--epochs", "4", "--queue-size", "16"),
    "infonce_cpc.py": ("--epochs", "4", "--image-size", "16"),
}
# The exact-resume test makes the views of these methods on the device, and of the others in the
# data loader, so that both ways are resumed.
ON_DEVICE = {"simclr.py", "infonce_cpc.py"}


def method_command(script: str, image_folder, output_dir, *extra: str) -> list[str]:
    return [sys.executable, script, *RUN_ARGS, *METHOD_ARGS[script], "--data-dir", str(image_folder),
            "--output-dir", str(output_dir), *extra]


def load(run_dir) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


def losses(run_dir) -> list[float]:
    return [line["loss"] for line in read_metrics(run_dir) if "loss" in line]


def logged_steps(run_dir) -> int:
    """The last step in the run's metrics.jsonl, 0 while there is none."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.strip().endswith("}")]
    return max(steps, default=0)


def stop_with_sigterm(command: list[str], run_dir, after_step: int) -> subprocess.CompletedProcess:
    """Start `command`, send SIGTERM once it has logged `after_step`, and wait for it to exit."""
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=script_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + SCRIPT_TIMEOUT_S
    while logged_steps(run_dir) < after_step and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=SCRIPT_TIMEOUT_S)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def assert_same_state(straight: dict, resumed: dict) -> None:
    different = [name for name, value in straight["model"].items() if not torch.equal(value, resumed["model"][name])]
    assert different == [], f"model entries differ after resume: {different[:5]}"
    for index, state in straight["optimizer"]["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                assert torch.equal(value, resumed["optimizer"]["state"][index][key]), f"{key} of parameter {index}"


@pytest.mark.parametrize("script", sorted(METHOD_ARGS))
def test_sigterm_resume_bit_identical(script, image_folder, tmp_path):
    straight_dir, stopped_dir = tmp_path / "straight", tmp_path / "stopped"
    views = "--augment-on-device" if script in ON_DEVICE else "--no-augment-on-device"
    straight = subprocess.run(method_command(script, image_folder, straight_dir, "--max-steps", "6", views),
                              cwd=REPO_ROOT, env=script_env(), capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S)
    assert straight.returncode == 0, describe_failure(straight)

    command = method_command(script, image_folder, stopped_dir, "--max-steps", "6", views, "--resume", "auto")
    stopped = stop_with_sigterm(command, stopped_dir, after_step=2)
    checkpoint = stopped_dir / "checkpoint.pt"
    assert stopped.returncode == 128 + signal.SIGTERM, describe_failure(stopped)
    assert f"stopped by SIGTERM after finishing the step; the checkpoint is {checkpoint}" in stopped.stdout
    assert f"--resume {checkpoint}" in stopped.stdout
    assert "--resume auto --" not in stopped.stdout.splitlines()[-1], "the printed command kept --resume auto"
    stop_step = load(stopped_dir)["step"]
    assert 2 <= stop_step < 6, f"SIGTERM after step 2 should stop before step 6, checkpoint at {stop_step}"

    # The same command again: --resume auto finds the checkpoint and finishes the 6 steps.
    resumed = subprocess.run(command, cwd=REPO_ROOT, env=script_env(), capture_output=True, text=True,
                             timeout=SCRIPT_TIMEOUT_S)
    assert resumed.returncode == 0, describe_failure(resumed)
    assert load(stopped_dir)["step"] == 6
    assert_same_state(load(straight_dir), load(stopped_dir))
    assert losses(stopped_dir) == losses(straight_dir), "the resumed run saw other data or augmentations"


def test_resume_auto_without_checkpoint_starts(image_folder, tmp_path):
    run_dir = tmp_path / "new"
    result = run_script(*method_command("simclr.py", image_folder, run_dir, "--max-steps", "1",
                                        "--resume", "auto")[1:])
    assert result.returncode == 0, describe_failure(result)
    assert load(run_dir)["step"] == 1


def test_resume_auto_needs_output_dir(image_folder):
    result = run_script("simclr.py", *RUN_ARGS, "--data-dir", str(image_folder), "--resume", "auto")
    assert result.returncode != 0
    assert "--resume auto needs --output-dir" in result.stderr


def test_stop_signal_exit_status(tmp_path):
    # A stop signal at a step boundary of a one-process run: requested() reports it, exit() uses 143.
    script = tmp_path / "stop.py"
    script.write_text(
        "import os, signal, sys\n"
        f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
        "import common\n"
        "env = common.read_dist_env()\n"
        "stopper = common.StopSignal()\n"
        "assert not stopper.requested(env)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "assert stopper.requested(env) and stopper.stopping\n"
        "stopper.exit('RUN/checkpoint.pt', env)\n"
    )
    result = subprocess.run([sys.executable, str(script), "--max-steps", "3"], env=script_env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 128 + signal.SIGINT, describe_failure(result)
    assert "stopped by SIGINT after finishing the step; the checkpoint is RUN/checkpoint.pt" in result.stdout
    assert "--max-steps 3 --resume RUN/checkpoint.pt" in result.stdout


def test_resume_command_drops_resume():
    argv = ["--resume", "auto", "--batch-size", "8", "--resume=RUN/checkpoint.pt", "--overwrite", "--output-dir", "RUN"]
    assert common.without_resume(argv) == ["--batch-size", "8", "--output-dir", "RUN"]


def test_sigkill_during_save_keeps_previous(tmp_path):
    path = tmp_path / "checkpoint.pt"
    common.atomic_save({"step": 1}, str(path))
    script = tmp_path / "save.py"
    script.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
        "import common\n"
        f"common.atomic_save({{'step': 2, 'weights': torch.ones(400_000_000, dtype=torch.uint8)}}, {str(path)!r})\n"
    )
    process = subprocess.Popen([sys.executable, str(script)], env=script_env())
    deadline = time.monotonic() + 120
    partial = []
    while not partial and process.poll() is None and time.monotonic() < deadline:
        partial = [name for name in os.listdir(tmp_path) if name.startswith("checkpoint.pt.tmp-")
                   and os.path.getsize(tmp_path / name) > 0]
        time.sleep(0.005)
    process.kill()
    process.wait(timeout=60)
    assert partial, "the temporary file never appeared while the process was writing"
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_unreadable_image_skipped(image_folder, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(image_folder, folder)
    broken = folder / "train" / "class_c" / "broken.png"
    broken.write_bytes(b"not a png")
    dataset = common.image_folder(str(folder / "train"), None)
    index = [path for path, _ in dataset.samples].index(str(broken))
    image, label = dataset[index]
    assert dataset.samples[index + 1][0] != str(broken)
    assert image.size == (32, 32)
    assert label == dataset.samples[(index + 1) % len(dataset)][1]
    assert dataset.skipped == {str(broken)}

    result = run_script("simclr.py", *RUN_ARGS, *METHOD_ARGS["simclr.py"], "--data-dir", str(folder),
                        "--output-dir", str(tmp_path / "run"), "--max-steps", "4")
    assert result.returncode == 0, describe_failure(result)
    assert f"warning: skipped unreadable image {broken}" in result.stderr
    assert load(tmp_path / "run")["step"] == 4


def test_all_images_unreadable(tmp_path):
    (tmp_path / "a").mkdir()
    for i in range(2):
        (tmp_path / "a" / f"{i}.png").write_bytes(b"broken")
    dataset = common.image_folder(str(tmp_path), None)
    with pytest.raises(common.UnreadableImageError, match="none of the 2 images"):
        dataset[0]


def launch_node(script: str, port: int, extra: tuple[str, ...]):
    """Start one torchrun node of a two-node run on 127.0.0.1, one process per node."""
    # c10d assigns the ranks, so the nodes need no --node-rank.
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               "--rdzv-id=loopback-test", "--local-addr=127.0.0.1", "--max-restarts=0", script, *extra]
    env = script_env({"GLOO_SOCKET_IFNAME": "lo" if sys.platform.startswith("linux") else "lo0"})
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


@pytest.mark.parametrize("script", ["simclr.py", "moco.py"])
def test_two_nodes_on_loopback(script, image_folder, tmp_path):
    port = free_port()
    extra = (*RUN_ARGS, *METHOD_ARGS[script], "--data-dir", str(image_folder), "--output-dir", str(tmp_path / "run"),
             "--max-steps", "3")
    if script == "simclr.py":
        extra = (*extra, "--no-sync-bn")
    nodes = [launch_node(script, port, extra) for _ in range(2)]
    outputs = [node.communicate(timeout=SCRIPT_TIMEOUT_S) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, f"node exited with {node.returncode}\n{stdout[-2000:]}\n{stderr[-3000:]}"
    combined = outputs[0][0] + outputs[1][0]
    assert "processes 2" in combined
    # Parameters and buffers hashed on each rank (MoCo's queue and key encoder included).
    assert "weights identical on all 2 processes" in combined
    assert load(tmp_path / "run")["step"] == 3


def child_pids(parent: int) -> list[int]:
    """The processes whose parent is `parent` (Linux /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:  # the process has exited
                continue
            if int(fields[1]) == parent:
                children.append(int(entry))
    return children


@pytest.mark.parametrize("failure", ["killed", "hung"])
def test_dead_peer_stops_run(failure, image_folder, tmp_path):
    # A killed peer closes its connections, and the survivor fails at its next collective. A hung
    # (stopped) peer keeps them open, and only --dist-timeout ends the survivor's wait.
    run_dir = tmp_path / "run"
    extra = (*RUN_ARGS, "--epochs", "1000", "--warmup-epochs", "1", "--no-sync-bn", "--data-dir", str(image_folder),
             "--output-dir", str(run_dir), "--dist-timeout", "15")
    port = free_port()
    survivor, victim = (launch_node("simclr.py", port, extra) for _ in range(2))
    try:
        deadline = time.monotonic() + SCRIPT_TIMEOUT_S
        while logged_steps(run_dir) < 2 and survivor.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert logged_steps(run_dir) >= 2, "the two-node run did not start"
        # torchrun starts its training process in a session of its own, so signal that process.
        workers = child_pids(victim.pid)
        assert len(workers) == 1, f"expected one training process under node 1's torchrun, found {workers}"
        os.kill(workers[0], signal.SIGKILL if failure == "killed" else signal.SIGSTOP)
        failed_at = time.monotonic()
        stdout, stderr = survivor.communicate(timeout=120)
        waited = time.monotonic() - failed_at
    finally:
        for process in (survivor, victim):
            for pid in child_pids(process.pid):
                os.kill(pid, signal.SIGKILL)
            process.kill()
            process.communicate(timeout=60)
    assert survivor.returncode != 0, f"node 0 exited with 0 after its peer {failure}\n{stdout[-2000:]}"
    assert waited < 15 + 45, f"node 0 took {waited:.0f} s to stop after its peer {failure}"
    if failure == "hung":
        assert waited >= 10, f"node 0 stopped after {waited:.0f} s, before its 15 s timeout could expire"


def test_resume_other_architecture_rejected(pretrained_run, image_folder, tmp_path):
    shutil.copytree(pretrained_run.dir, tmp_path / "run")
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    result = run_script("simclr.py", "--dataset", "folder", "--batch-size", "8", "--workers", "0", "--epochs", "4",
                        "--warmup-epochs", "1", "--knn-every", "1", "--log-every", "1", "--data-dir", str(image_folder),
                        "--arch", "resnet34", "--resume", str(tmp_path / "run" / "checkpoint.pt"))
    assert result.returncode != 0
    assert "--arch" in result.stderr, result.stderr
    assert "resnet18" in result.stderr, result.stderr
    assert "resnet34" in result.stderr, result.stderr
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_eval_linear_sigterm_message(pretrained_run):
    command = [sys.executable, "eval_linear.py", "--checkpoint", str(pretrained_run.checkpoint), "--epochs", "100000",
               "--workers", "0"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=script_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    time.sleep(8)  # past the start-up, into feature extraction or the probe
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=SCRIPT_TIMEOUT_S)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "eval_linear.py: stopped by SIGTERM before it finished; it writes nothing part-way" in stderr


def test_unwritable_output_dir_rejected(image_folder, tmp_path):
    # A folder below a regular file cannot be created, even by root.
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_script("simclr.py", *RUN_ARGS, *METHOD_ARGS["simclr.py"], "--data-dir", str(image_folder),
                        "--output-dir", str(blocker / "run"), "--max-steps", "1")
    assert result.returncode != 0
    assert f"error: cannot write to --output-dir {blocker / 'run'}" in result.stderr, result.stderr
    assert blocker.read_text() == "not a folder"


def test_resume_missing_checkpoint_rejected(image_folder, tmp_path):
    missing = tmp_path / "run" / "checkpoint.pt"
    result = run_script("simclr.py", *RUN_ARGS, *METHOD_ARGS["simclr.py"], "--data-dir", str(image_folder),
                        "--resume", str(missing))
    assert result.returncode != 0
    assert f"error: checkpoint {missing} not found" in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_dist_timeout_must_be_positive(value, image_folder, tmp_path):
    parsed = float(value)  # the message prints the value as tyro parsed it
    result = run_script("simclr.py", *RUN_ARGS, "--data-dir", str(image_folder), "--output-dir", str(tmp_path / "run"),
                        "--dist-timeout", value)
    assert result.returncode != 0
    assert f"--dist-timeout {parsed} must be a positive finite number" in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def test_second_sigint_exits_with_workers(image_folder, tmp_path):
    # Loader workers ignore SIGTERM, so the exit on the KeyboardInterrupt of a second Ctrl-C must
    # still end them rather than wait for them forever.
    run_dir = tmp_path / "run"
    command = [sys.executable, "simclr.py", *RUN_ARGS[:-6], "--workers", "2", "--knn-every", "0", "--log-every", "1",
               *METHOD_ARGS["simclr.py"], "--data-dir", str(image_folder), "--output-dir", str(run_dir)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=script_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + SCRIPT_TIMEOUT_S
    while logged_steps(run_dir) < 1 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = child_pids(process.pid)

    process.send_signal(signal.SIGINT)
    time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    try:
        process.communicate(timeout=60)
        time.sleep(1)
        alive = [pid for pid in workers if running(pid)]
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail("the training process still ran 60 s after a second SIGINT")
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    assert len(workers) == 2, f"expected 2 loader workers, found {workers}"
    assert process.returncode != 0
    assert alive == [], "loader workers outlived the run"


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
