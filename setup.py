"""Packaging is declared in pyproject.toml; this file only adds one start-up hook to the wheel.

``campus_search_gunicorn_keepalive.pth`` lets the customer's production command run as written: the
brief spells gunicorn's ``--keep-alive`` option ``--keepalive``, which gunicorn rejects. The hook rewrites
that one argument, and only when the running program is gunicorn (its ``gunicorn`` script or
``python -m gunicorn``); it imports nothing.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "campus_search_gunicorn_keepalive.pth"


class BuildWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(str(Path(__file__).parent / PTH), str(Path(self.build_lib) / PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


setup(cmdclass={"build_py": BuildWithPth})
