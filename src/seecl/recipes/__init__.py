"""Recipes: whole runs that read top to bottom (the demo, the SuperNI benchmark). Nothing below imports them."""
