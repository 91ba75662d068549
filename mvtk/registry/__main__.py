"""`python -m mvtk.registry`: the registry's command line, `mvtk.registry.cli.main` (Lesson 04, §7)."""
import sys

from mvtk.registry.cli import main

sys.exit(main())
