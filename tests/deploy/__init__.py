"""The deployment files: Dockerfile, compose files, deploy/ and the example configs."""
