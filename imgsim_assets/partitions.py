from dagster import DynamicPartitionsDefinition

# One partition per image batch: a folder under <data>/images/, named by the folder.
image_batches = DynamicPartitionsDefinition(name="image_batches")
