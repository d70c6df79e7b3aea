"""`lowvram chat` in a pseudo-terminal, typed into as a person would; `lowvram generate` piped."""

import fcntl
import os
import pty
import signal
import select
import shutil
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from conftest import EXAMPLE as MODEL, need_example, need_reference

# the console script pip installed (what a user types), beside this interpreter
_SCRIPT = Path(sys.executable).with_name("lowvram")
CMD = [str(_SCRIPT) if _SCRIPT.exists() else shutil.which("lowvram") or ""]


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
    need_example()
    if not CMD[0]:
        pytest.skip("the lowvram console script is not installed (pip install -e .)")
    return MODEL


def _controlling_tty():
    """In the child: a session of its own whose terminal is the pty, so ^C typed there sends SIGINT.

    SIGINT back to its default too: a test run started in the background by a non-interactive shell
    inherits SIGINT ignored, and Python then never turns ^C into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def in_terminal(args):
    master, slave = pty.openpty()
    p = subprocess.Popen(CMD + args, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                         preexec_fn=_controlling_tty)
    os.close(slave)
    return p, master


def test_chat_in_a_terminal(example):
    p, master = in_terminal(["chat", str(example), "--greedy", "--max-new-tokens", "24"])
    buf = bytearray()
    try:
        screen = read_until(master, b"You: ", buf)
        assert b"loaded" in screen and b"clear" in screen
        os.write(master, b"What is json.dumps?\n")
        first = read_until(master, b"You: ", buf)
        assert b"glm4-tiny: " in first and len(first.split(b"glm4-tiny: ")[1].strip()) > 5
        os.write(master, b"And what is os.path.join?\n")
        second = read_until(master, b"You: ", buf)
        assert b"glm4-tiny: " in second
        os.write(master, b"clear\n")
        assert b"history cleared" in read_until(master, b"You: ", buf)
        os.write(master, b"stop\n")
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)


def test_ctrl_c_interrupts_the_answer_not_the_session(example):
    p, master = in_terminal(["chat", str(example), "--ignore-eos", "--max-new-tokens", "100000", "--seed", "0"])
    buf = bytearray()
    try:
        read_until(master, b"You: ", buf)
        os.write(master, b"What is json.dumps?\n")
        read_until(master, b"glm4-tiny: ", buf)
        read_until(master, b" ", buf)  # it is answering (up to the 2048-token context: seconds)
        os.write(master, b"\x03")
        assert b"[interrupted]" in read_until(master, b"You: ", buf)
        os.write(master, b"What is os.path.join?\n")  # the session goes on: it answers again
        read_until(master, b"glm4-tiny: ", buf)
        read_until(master, b" ", buf)
        os.write(master, b"\x03")  # (a whole answer to the context end is slow on a busy machine)
        assert b"[interrupted]" in read_until(master, b"You: ", buf)
        os.write(master, b"\x04")  # Ctrl-D
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)


def test_generate_piped(example):
    prompt = "Return the number of"
    r = subprocess.run(CMD + ["generate", str(example), "--greedy", "--max-new-tokens", "16"],
                       input=prompt + "\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and r.stderr == ""  # the continuation only: no progress output when piped
    r2 = subprocess.run(CMD + ["generate", str(example), "--greedy", "--max-new-tokens", "16", "--prompt", prompt],
                        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r2.returncode == 0 and r2.stdout == r.stdout  # --prompt and stdin (echo's newline dropped) are one prompt


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_kv_int8_flag_reaches_the_model(command, example):
    """chat/generate --kv-int8: the loaded model keeps its KV cache in int8 (as bench --kv-int8 does)."""
    from lowvram.chat_cli import _load
    from lowvram.cli import parser
    from lowvram.models.glm import Int8KV

    for flags, int8 in (([], False), (["--kv-int8"], True)):
        m = _load(parser().parse_args([command, str(example), *flags]))
        assert m.kv_int8 is int8 and isinstance(m.new_cache(4)[0], Int8KV) is int8


def test_system_prompt_where_the_format_has_none(tiny, tmp_path):
    """ChatGLM2 has no system role: one line saying so, non-zero exit, before any turn."""
    if not CMD[0]:
        pytest.skip("the lowvram console script is not installed (pip install -e .)")
    tok = need_reference("tokenizers/chatglm3") / "tokenizer.model"
    ckpt = tiny("chatglm2-6b", padded_vocab_size=65024)
    shutil.copy(tok, ckpt / "tokenizer.model")
    r = subprocess.run(CMD + ["chat", str(ckpt), "--chat-format", "chatglm2", "--system", "Be brief."],
                       capture_output=True, text=True, input="hello\n", timeout=120)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "system" in r.stderr, r.stderr


def test_missing_model_is_one_line_error(tmp_path):
    if not CMD[0]:
        pytest.skip("the lowvram console script is not installed (pip install -e .)")
    r = subprocess.run(CMD + ["chat", str(tmp_path / "none")], capture_output=True, text=True, input="")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1


def test_a_full_context_is_said(example):
    """Output the context cut short says so (generate: on stderr; chat: after the answer); output ended by
    --max-new-tokens does not."""
    r = subprocess.run(CMD + ["generate", str(example), "--ignore-eos", "--ctx", "30", "--max-new-tokens", "100"],
                       input="hi", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    assert r.stderr == "(stopped: the context of 30 tokens is full)\n"
    r = subprocess.run(CMD + ["generate", str(example), "--ignore-eos", "--max-new-tokens", "5"],
                       input="hi", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() and r.stderr == ""
    r = subprocess.run(CMD + ["chat", str(example), "--ignore-eos", "--ctx", "40", "--max-new-tokens", "100",
                              "--seed", "0"], input="hi\nstop\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert " (stopped: the context of 40 tokens is full; `clear` starts over)\n" in r.stdout


@pytest.mark.parametrize("cmd,flag,value,least", [("generate", "--ctx", "0", 1), ("chat", "--max-new-tokens", "-1", 0),
                                                   ("bench", "--ctx", "0", 1)])
def test_counts_are_named_as_flags(cmd, flag, value, least, tmp_path, capsys):
    from lowvram.cli import main

    assert main([cmd, str(tmp_path / "not-loaded"), flag, value]) == 1
    assert capsys.readouterr().err == f"lowvram: error: {flag} must be >= {least}, got {value}\n"
