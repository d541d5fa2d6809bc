from libs.common.service import main
from services.threader.service import ThreaderService

main(ThreaderService)
