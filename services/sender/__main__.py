from libs.common.service import main
from services.sender.service import SenderService

main(SenderService)
