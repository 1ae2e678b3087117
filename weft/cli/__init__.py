"""The `weft` command: serve, replay and agent (`main`), and the commands that talk to a running
weft over REST (`rest_commands`)."""
