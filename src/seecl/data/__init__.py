"""Tasks, file formats, synthetic tasks and prompt formatting."""

from seecl.data.formats import load_instances, load_task
from seecl.data.task import Instance, Task

__all__ = ["Instance", "Task", "load_instances", "load_task"]
