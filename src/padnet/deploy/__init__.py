"""Deployment: fold a trained PAD model into its compact inference form (docs/method.md §5)."""

from padnet.deploy.compact import pack, unpack
from padnet.deploy.conv import DEPLOY_PATHS, DeployedConv2d
from padnet.deploy.export import DEPLOYED_TYPES, export, register_deployer
from padnet.deploy.graph import export_onnx, export_program
from padnet.deploy.io import load, save, stored_bytes
from padnet.deploy.moe import DeployedMoE

__all__ = ["DEPLOYED_TYPES", "DEPLOY_PATHS", "DeployedConv2d", "DeployedMoE", "export",
           "export_onnx", "export_program", "load", "pack", "register_deployer", "save",
           "stored_bytes", "unpack"]
