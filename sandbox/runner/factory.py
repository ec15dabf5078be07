"""The executor the settings name. A backend that cannot run here is reported, and script
jobs are refused; nothing falls back to weaker isolation."""

from __future__ import annotations

from sandbox.config import Settings
from sandbox.runner.contract import Executor, IsolationUnavailable


def make_executor(settings: Settings) -> Executor:
    if settings.runner_backend == "bubblewrap":
        from sandbox.runner.bubblewrap import BubblewrapExecutor
        return BubblewrapExecutor(settings.runner_root, prestart=settings.runner_prestart)
    if settings.runner_backend == "docker":
        from sandbox.runner.docker_backend import DockerExecutor
        return DockerExecutor(image=settings.docker_image, runtime=settings.docker_runtime,
                              root=settings.runner_root)
    if settings.environment == "prod":
        raise IsolationUnavailable("the stub runner has no isolation and is refused in prod")
    from sandbox.runner.stub import StubExecutor
    return StubExecutor()
