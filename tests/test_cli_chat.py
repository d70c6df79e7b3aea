"""`lowvram chat` in a pseudo-terminal, typed into as a person would; `lowvram generate` piped."""

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

MODEL = Path(__file__).resolve().parents[1] / "examples" / "glm4-tiny"
CMD = [sys.executable, "-m", "lowvram.cli"]


def read_until(fd, marker: bytes, buf: bytearray, timeout=120) -> bytes:
    end = time.time() + timeout
    while marker not in buf:
        if time.time() > end:
            raise AssertionError(f"timed out waiting for {marker!r}; screen so far: {bytes(buf)[-800:]!r}")
        r, _, _ = select.select([fd], [], [], 0.5)
        if r:
            try:
                buf += os.read(fd, 4096)
            except OSError:
                break
    i = buf.index(marker) + len(marker)
    out = bytes(buf[:i])
    del buf[:i]
    return out


@pytest.fixture
def example():
    if not MODEL.exists():
        pytest.skip("examples/glm4-tiny not built")
    return MODEL


def test_chat_in_a_terminal(example):
    master, slave = pty.openpty()
    p = subprocess.Popen(CMD + ["chat", str(example), "--greedy", "--max-new-tokens", "24"], stdin=slave,
                         stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    buf = bytearray()
    try:
        screen = read_until(master, b"You: ", buf)
        assert b"loaded" in screen and b"clear" in screen
        os.write(master, b"What is json.dumps?\n")
        first = read_until(master, b"You: ", buf)
        assert b"glm-4-9b-chat: " in first and len(first.split(b"glm-4-9b-chat: ")[1].strip()) > 5
        os.write(master, b"And what is os.path.join?\n")
        second = read_until(master, b"You: ", buf)
        assert b"glm-4-9b-chat: " in second
        os.write(master, b"clear\n")
        assert b"history cleared" in read_until(master, b"You: ", buf)
        os.write(master, b"stop\n")
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)


def test_generate_piped(example):
    r = subprocess.run(CMD + ["generate", str(example), "--greedy", "--max-new-tokens", "16"],
                       input="Return the number of", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and r.stderr == ""  # no progress output when piped


def test_missing_model_is_one_line_error(tmp_path):
    r = subprocess.run(CMD + ["chat", str(tmp_path / "none")], capture_output=True, text=True, input="")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
