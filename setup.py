"""Package layout only; the metadata is in pyproject.toml.

``search_spaces/`` stays at the top of the source tree, where users look for it; wheels ship
its files inside the package as ``autoprune/_spaces`` (see ``autoprune.space.SPACES_DIR``).
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["autoprune", "autoprune.*"]), "autoprune._spaces"],
    package_dir={"autoprune._spaces": "search_spaces"},
    package_data={"autoprune._spaces": ["*.yaml"]},
)
