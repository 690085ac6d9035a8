"""Putting models behind endpoints: the Ray Serve launcher (`orchestrator serve`) and KubeRay manifests."""
