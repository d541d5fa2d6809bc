from libs.common.service import main
from services.notifier.service import NotifierService

main(NotifierService)
