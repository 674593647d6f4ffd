#!/usr/bin/env python3
"""scripts/compile-unet.py's argument errors, named before torch is imported (so this runs on any Python 3).

    test_compile_unet_args.py FIXTURES
"""
import os
import subprocess
import sys
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "compile-unet.py")
FIXTURES = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "..", "shared", "fixtures")
MODEL = os.path.join(FIXTURES, "models", "tiny-sd21")


def compile_unet(*args):
    r = subprocess.run([sys.executable, SCRIPT, *args, "--out", "/nonexistent/never-written.pt2"],
                       capture_output=True, text=True, timeout=60)
    return r.returncode, r.stderr


@unittest.skipUnless(os.path.isdir(MODEL), "needs the tiny-sd21 fixture")
class Arguments(unittest.TestCase):
    def test_rows_that_are_not_a_count_or_a_range(self):
        for bad in ("x", "1-x", "4-", "-3"):
            rc, err = compile_unet(MODEL, "--rows", bad)
            self.assertEqual(rc, 1, err)
            self.assertIn(f"--rows {bad!r} is not N or MIN-MAX", err)
        for bad in ("0", "4-2", "0-8"):
            rc, err = compile_unet(MODEL, "--rows", bad)
            self.assertEqual(rc, 1, err)
            self.assertIn("--rows N >= 1 (or MIN-MAX with 1 <= MIN <= MAX)", err)

    def test_a_size_that_is_not_a_multiple_of_8(self):
        rc, err = compile_unet(MODEL, "--width", "60")
        self.assertEqual(rc, 1, err)
        self.assertIn("--width / --height must be multiples of 8", err)

    def test_a_folder_without_a_unet_config(self):
        rc, err = compile_unet(FIXTURES, "--rows", "1-4")
        self.assertEqual(rc, 1, err)
        self.assertIn("config.json not found (expected a diffusers folder with unet/)", err)


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)
