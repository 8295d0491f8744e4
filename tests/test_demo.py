"""The README's engine demo runs from a plain checkout and ends with every volume checked."""

from __future__ import annotations

import subprocess
import sys


def test_the_refresh_demo_ends_with_every_volume_matching_the_model() -> None:
    result = subprocess.run([sys.executable, "-m", "volkin.demo", "--blocks", "6"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "Refresh V2 from V1" in result.stdout
    started, copied = result.stdout.split("4. The background copy")
    assert "R=111111" in started  # instant: nothing copied when the refresh starts
    assert "R=000000" in copied  # and everything once the background copy is done
    for name in ("V1", "V2", "S2"):
        assert f"  {name}: ok" in result.stdout
