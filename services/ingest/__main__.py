from libs.common.service import main
from services.ingest.service import IngestService

main(IngestService)
