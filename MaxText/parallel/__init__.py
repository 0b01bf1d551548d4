"""Devices and meshes: logical axis rules, multi-process start-up, TPU topologies, sharding reports."""
