"""`fedvox import`: hospital data as hospitals hold it -> a hospital site.

registry.py (one entry per importer) and cli.py (the subcommand built from it); the importers
(dicom.py with dicom_scan.py and dicom_convert.py, nnunet.py) write through the one site
writer (common/site/writer.py); state.py keeps the node's salt and case mapping.
"""
