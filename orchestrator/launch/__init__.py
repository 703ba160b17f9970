"""How worker processes are started and watched: the Launcher seam, local and Ray launchers."""
