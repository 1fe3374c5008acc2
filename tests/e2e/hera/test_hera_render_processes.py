"""Rendering templates/ is deterministic across processes: fresh interpreters with different hash
seeds render exactly what this one did. Separate processes are the point (set and dict order
under another PYTHONHASHSEED), so this is an end-to-end test; the rest of the rendering and
`keybrake templates render` is tests/hera/test_hera_render.py, in-process."""

from __future__ import annotations

import os
import subprocess
import sys

from keybrake.hera_workflows.render import RenderedFile


def test_rendering_is_deterministic_across_processes(rendered: list[RenderedFile]) -> None:
    code = (
        "from keybrake.hera_workflows.render import rendered_files\n"
        "import sys\n"
        "for f in rendered_files(): sys.stdout.write(f.path + '\\n' + f.text)\n"
    )
    # Both interpreters at once: neither waits for the other to import Hera.
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in ("1", "2")
    ]
    outputs = set()
    for process in processes:
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        outputs.add(stdout)
    assert outputs == {"".join(f.path + "\n" + f.text for f in rendered)}
