"""Packaging beyond pyproject.toml: the experiment presets travel in the wheel.

The repository keeps the presets in ``launch/``, where users look for them; setuptools
maps that folder to the package data folder ``zmqgossip/presets`` so that an installed
wheel (or an sdist built into one) lists and runs the same presets. No copy is kept in
the source tree, so there is one file per preset to edit.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["zmqgossip", "zmqgossip.*"]), "zmqgossip.presets"],
    package_dir={"zmqgossip.presets": "launch"},
    package_data={"zmqgossip.presets": ["*.toml"]},
)
