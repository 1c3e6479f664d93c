"""Tasks, file formats, synthetic tasks and prompt formatting."""

from .formats import load_instances, load_task
from .task import Instance, Task

__all__ = ["Instance", "Task", "load_instances", "load_task"]
