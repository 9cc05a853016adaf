"""Every sentence the portal shows, one catalogue per language: en cs hu es uk ru pt (docs/reference.md, Portal).

Every catalogue has every key (the ``Messages`` TypedDict and a unit test keep them in step);
an ISP rewords any of them per language with ``portal.texts`` without touching code.
Translations are plain text, never HTML: the page escapes them. The only placeholders are
``$provider``, ``$phone``, ``$term`` and ``$until``, and only in the keys listed in
``PLACEHOLDERS``; ``$$`` is a literal dollar sign. ``$term`` ("3 days") and ``$until`` (a date
and time) are built from ``TERM_UNITS`` and ``DATE_FORMATS`` below, in the same language.

Reasons are categories from billing, deliberately vague: the page must not reveal amounts,
names or addresses to whoever happens to be using the connection.

Portuguese is European Portuguese ("ligação", "contacto"); a Brazilian ISP can reword it
through ``portal.texts.pt``.
"""

from __future__ import annotations

from typing import Literal, TypedDict

DEFAULT_LANGUAGE = "en"


class Messages(TypedDict):
    # the page title (browser tab), heading and one-line summary, per state of the caller
    title_restricted: str
    heading_restricted: str
    summary_restricted: str
    title_notice: str
    heading_notice: str
    summary_notice: str
    title_throttle: str
    heading_throttle: str
    summary_throttle: str
    title_acknowledged: str
    heading_acknowledged: str
    summary_acknowledged: str
    title_active: str
    heading_active: str
    summary_active: str
    # why: one sentence per reason category
    reason_overdue: str
    reason_suspended: str
    reason_notice: str
    reason_fair_use: str
    reason_security: str
    reason_verification: str
    reason_other: str
    # how to pay
    pay_heading: str
    pay_online: str
    pay_contact: str
    pay_restore: str
    # the notice interstitial and what pressing its button can lead to
    continue_intro: str
    continue_button: str
    continue_not_needed: str
    continue_failed: str
    # "I promise to pay" (policy.promise_to_pay) and what pressing it can lead to
    promise_heading: str
    promise_intro: str
    promise_button: str
    promise_refused_soon: str
    promise_refused: str
    promise_not_needed: str
    # the enforcer did not see this address connect to the portal lately, so it will not act for it
    reload_needed: str
    # on a page of a caller who may browse: a link back to the page they had asked for
    back_to_page: str
    title_promised: str
    heading_promised: str
    summary_promised: str
    title_expired: str
    summary_expired: str
    title_too_many: str
    summary_too_many: str
    back_link: str
    # how to reach the provider
    contact_heading: str
    contact_phone: str
    contact_email: str
    contact_hours: str
    reference_label: str
    reference_hint: str
    # portal.show_account
    account_heading: str
    account_label: str
    address_label: str
    # "how to know this page is really from us"
    trust_named: str
    trust_unnamed: str
    trust_never: str
    trust_call: str
    language_label: str


MessageKey = Literal[
    "title_restricted", "heading_restricted", "summary_restricted",
    "title_notice", "heading_notice", "summary_notice",
    "title_throttle", "heading_throttle", "summary_throttle",
    "title_acknowledged", "heading_acknowledged", "summary_acknowledged",
    "title_active", "heading_active", "summary_active",
    "reason_overdue", "reason_suspended", "reason_notice", "reason_fair_use", "reason_security",
    "reason_verification", "reason_other",
    "pay_heading", "pay_online", "pay_contact", "pay_restore",
    "continue_intro", "continue_button", "continue_not_needed", "continue_failed",
    "promise_heading", "promise_intro", "promise_button", "promise_refused_soon", "promise_refused",
    "promise_not_needed", "reload_needed", "back_to_page", "title_promised", "heading_promised", "summary_promised",
    "title_expired", "summary_expired", "title_too_many", "summary_too_many", "back_link",
    "contact_heading", "contact_phone", "contact_email", "contact_hours",
    "reference_label", "reference_hint",
    "account_heading", "account_label", "address_label",
    "trust_named", "trust_unnamed", "trust_never", "trust_call", "language_label",
]
ReasonKey = Literal["reason_overdue", "reason_suspended", "reason_notice", "reason_fair_use",
                    "reason_security", "reason_verification", "reason_other"]

#: Placeholders a message may use (substituted before escaping); every other key has none.
PLACEHOLDERS: dict[str, frozenset[str]] = {
    "trust_named": frozenset({"provider"}),
    "trust_call": frozenset({"phone"}),
    "promise_intro": frozenset({"term"}),
    "summary_promised": frozenset({"until"}),
}

#: ``$term`` is a number and a unit in the form the sentence around it needs ("na 3 dny",
#: "3 napra"): per language and unit, the forms for one, few (cs, uk, ru: 2-4) and many.
TERM_UNITS: dict[str, dict[str, tuple[str, str, str]]] = {
    "en": {"day": ("day", "days", "days"), "hour": ("hour", "hours", "hours")},
    "cs": {"day": ("den", "dny", "dní"), "hour": ("hodinu", "hodiny", "hodin")},
    "hu": {"day": ("napra", "napra", "napra"), "hour": ("órára", "órára", "órára")},
    "es": {"day": ("día", "días", "días"), "hour": ("hora", "horas", "horas")},
    "uk": {"day": ("день", "дні", "днів"), "hour": ("годину", "години", "годин")},
    "ru": {"day": ("день", "дня", "дней"), "hour": ("час", "часа", "часов")},
    "pt": {"day": ("dia", "dias", "dias"), "hour": ("hora", "horas", "horas")},
}

#: ``$until``: how each language writes a date and time (24-hour clock; the zone follows).
DATE_FORMATS: dict[str, str] = {
    "en": "{day} {month_name} {year}, {hour:02}:{minute:02}",
    "cs": "{day}. {month}. {year} {hour:02}:{minute:02}",
    "hu": "{year}. {month:02}. {day:02}. {hour:02}:{minute:02}",
    "es": "{day:02}/{month:02}/{year} {hour:02}:{minute:02}",
    "uk": "{day:02}.{month:02}.{year} {hour:02}:{minute:02}",
    "ru": "{day:02}.{month:02}.{year} {hour:02}:{minute:02}",
    "pt": "{day:02}/{month:02}/{year} {hour:02}:{minute:02}",
}
MONTH_NAMES_EN = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
                  "October", "November", "December")


def plural_form(language: str, n: int) -> int:
    """0 (one), 1 (few) or 2 (many): which of ``TERM_UNITS``' forms goes with the number ``n``."""
    if language == "cs":
        return 0 if n == 1 else 1 if 2 <= n <= 4 else 2
    if language in ("uk", "ru"):
        if n % 10 == 1 and n % 100 != 11:
            return 0
        return 1 if 2 <= n % 10 <= 4 and not 12 <= n % 100 <= 14 else 2
    return 0 if n == 1 else 2

#: Reason categories (as billing writes them, normalised to lower case with ``_``) that have
#: their own sentence; any other reason gets ``reason_other``.
REASONS: dict[str, ReasonKey] = {
    "overdue": "reason_overdue",
    "unpaid": "reason_overdue",
    "suspended": "reason_suspended",
    "notice": "reason_notice",
    "fair_use": "reason_fair_use",
    "fup": "reason_fair_use",
    "security": "reason_security",
    "abuse": "reason_security",
    "malware": "reason_security",
    "verification": "reason_verification",
}

#: The language switcher names each language in itself.
LANGUAGE_NAMES: dict[str, str] = {
    "en": "English", "cs": "Čeština", "hu": "Magyar", "es": "Español", "uk": "Українська",
    "ru": "Русский", "pt": "Português",
}

EN: Messages = {
    "title_restricted": "Internet service restricted",
    "heading_restricted": "Your internet service is restricted",
    "summary_restricted": "Web access is limited until your account is settled.",
    "title_notice": "Important notice about your internet service",
    "heading_notice": "We have an important notice for you",
    "summary_notice": "Please read this notice. You can then continue to the internet.",
    "title_throttle": "Connection speed reduced",
    "heading_throttle": "Your connection speed is reduced",
    "summary_throttle": "Your connection runs at reduced speed until your account is settled. "
                        "After reading this notice you can continue to the internet.",
    "title_acknowledged": "You can continue",
    "heading_acknowledged": "You can continue browsing",
    "summary_acknowledged": "Thank you for reading the notice. You can now use the internet again.",
    "title_active": "Internet service active",
    "heading_active": "Your service is active",
    "summary_active": "Your internet access is not restricted. If a page did not load, please try again.",
    "reason_overdue": "Why: a payment on your account is overdue.",
    "reason_suspended": "Why: your service has been suspended.",
    "reason_notice": "Why: your provider has an important notice about your account.",
    "reason_fair_use": "Why: your service has reached its fair use limit.",
    "reason_security": "Why: a security problem was detected on your connection.",
    "reason_verification": "Why: we need to confirm some details of your account.",
    "reason_other": "Why: your account needs attention.",
    "pay_heading": "How to pay",
    "pay_online": "Pay online:",
    "pay_contact": "Contact your provider to settle your account.",
    "pay_restore": "Once your payment is received, full service returns automatically.",
    "continue_intro": "When you have read this notice, you can continue to the internet. "
                      "The notice may appear again until the matter is resolved.",
    "continue_button": "Continue to the internet",
    "continue_not_needed": "There is no notice to confirm for this connection.",
    "continue_failed": "We could not complete this step just now. Please try again in a moment.",
    "promise_heading": "Need a little more time?",
    "promise_intro": "If you cannot pay right now, you can promise to pay and get your full service back "
                     "for $term. If your payment has not arrived by then, the service will be restricted again.",
    "promise_button": "I promise to pay",
    "promise_refused_soon": "A promise to pay is not available again so soon. "
                            "Please pay to restore your service, or contact us.",
    "promise_refused": "A promise to pay is not available for this connection. "
                       "Please pay to restore your service, or contact us.",
    "promise_not_needed": "Your service is not restricted at the moment, so there is nothing to promise.",
    "reload_needed": "Please reload this page, then press the button again.",
    "back_to_page": "Continue to the page you asked for:",
    "title_promised": "Service restored",
    "heading_promised": "Your service is back",
    "summary_promised": "Your service is back until $until. Please pay by then, or it will be restricted again.",
    "title_expired": "This page has expired",
    "summary_expired": "For your security, the button only works for a limited time. "
                       "Please open the page again and press it once more.",
    "title_too_many": "Too many attempts",
    "summary_too_many": "Please wait a minute, then try again.",
    "back_link": "Open the page again",
    "contact_heading": "Contact",
    "contact_phone": "Phone",
    "contact_email": "Email",
    "contact_hours": "Hours",
    "reference_label": "Reference code",
    "reference_hint": "Please quote it when you contact us.",
    "account_heading": "Your connection",
    "account_label": "Account",
    "address_label": "IP address",
    "trust_named": "This page comes from your internet provider, $provider.",
    "trust_unnamed": "This page comes from your internet provider.",
    "trust_never": "We will never ask for your password or card details on this page.",
    "trust_call": "If in doubt, call us on $phone.",
    "language_label": "Language",
}

CS: Messages = {
    "title_restricted": "Internetové připojení je omezeno",
    "heading_restricted": "Vaše internetové připojení je omezeno",
    "summary_restricted": "Přístup na web je omezen, dokud nebude váš účet vyrovnán.",
    "title_notice": "Důležité upozornění k vašemu připojení",
    "heading_notice": "Máme pro vás důležité upozornění",
    "summary_notice": "Přečtěte si prosím toto upozornění. Poté můžete pokračovat na internet.",
    "title_throttle": "Rychlost připojení je snížena",
    "heading_throttle": "Rychlost vašeho připojení je snížena",
    "summary_throttle": "Vaše připojení běží sníženou rychlostí, dokud nebude váš účet vyrovnán. "
                        "Po přečtení tohoto upozornění můžete pokračovat na internet.",
    "title_acknowledged": "Můžete pokračovat",
    "heading_acknowledged": "Můžete pokračovat v prohlížení",
    "summary_acknowledged": "Děkujeme, že jste si upozornění přečetli. Nyní můžete internet opět používat.",
    "title_active": "Internetové připojení je aktivní",
    "heading_active": "Vaše připojení je aktivní",
    "summary_active": "Váš přístup k internetu není omezen. Pokud se stránka nenačetla, zkuste to prosím znovu.",
    "reason_overdue": "Důvod: na vašem účtu je platba po splatnosti.",
    "reason_suspended": "Důvod: vaše služba byla pozastavena.",
    "reason_notice": "Důvod: váš poskytovatel má k vašemu účtu důležité upozornění.",
    "reason_fair_use": "Důvod: byl vyčerpán limit férového užívání (FUP) vaší služby.",
    "reason_security": "Důvod: na vašem připojení byl zjištěn bezpečnostní problém.",
    "reason_verification": "Důvod: potřebujeme ověřit některé údaje vašeho účtu.",
    "reason_other": "Důvod: váš účet vyžaduje pozornost.",
    "pay_heading": "Jak zaplatit",
    "pay_online": "Zaplatit online:",
    "pay_contact": "Pro vyrovnání účtu kontaktujte svého poskytovatele.",
    "pay_restore": "Jakmile platbu obdržíme, plná služba se automaticky obnoví.",
    "continue_intro": "Po přečtení tohoto upozornění můžete pokračovat na internet. "
                      "Upozornění se může znovu zobrazit, dokud nebude záležitost vyřešena.",
    "continue_button": "Pokračovat na internet",
    "continue_not_needed": "Pro toto připojení není potřeba nic potvrzovat.",
    "continue_failed": "Tento krok se teď nepodařilo dokončit. Zkuste to prosím za chvíli znovu.",
    "promise_heading": "Potřebujete trochu víc času?",
    "promise_intro": "Pokud teď nemůžete zaplatit, můžete slíbit platbu a získat plnou službu zpět na $term. "
                     "Pokud do té doby platba nedorazí, služba bude znovu omezena.",
    "promise_button": "Slibuji, že zaplatím",
    "promise_refused_soon": "Slib platby nelze znovu využít tak brzy. "
                            "Pro obnovení služby prosím zaplaťte, nebo nás kontaktujte.",
    "promise_refused": "Slib platby není pro toto připojení k dispozici. "
                       "Pro obnovení služby prosím zaplaťte, nebo nás kontaktujte.",
    "promise_not_needed": "Vaše služba teď není omezena, není tedy co slibovat.",
    "reload_needed": "Načtěte prosím tuto stránku znovu a pak tlačítko stiskněte ještě jednou.",
    "back_to_page": "Pokračovat na stránku, kterou jste chtěli otevřít:",
    "title_promised": "Služba obnovena",
    "heading_promised": "Vaše služba opět funguje",
    "summary_promised": "Vaše služba funguje do $until. Do té doby prosím zaplaťte, jinak bude znovu omezena.",
    "title_expired": "Platnost stránky vypršela",
    "summary_expired": "Z bezpečnostních důvodů tlačítko funguje jen omezenou dobu. "
                       "Otevřete prosím stránku znovu a stiskněte ho ještě jednou.",
    "title_too_many": "Příliš mnoho pokusů",
    "summary_too_many": "Počkejte prosím minutu a zkuste to znovu.",
    "back_link": "Otevřít stránku znovu",
    "contact_heading": "Kontakt",
    "contact_phone": "Telefon",
    "contact_email": "E-mail",
    "contact_hours": "Provozní doba",
    "reference_label": "Referenční kód",
    "reference_hint": "Uveďte ho prosím, když nás budete kontaktovat.",
    "account_heading": "Vaše připojení",
    "account_label": "Zákaznické číslo",
    "address_label": "IP adresa",
    "trust_named": "Tuto stránku zobrazuje váš poskytovatel internetu $provider.",
    "trust_unnamed": "Tuto stránku zobrazuje váš poskytovatel internetu.",
    "trust_never": "Na této stránce po vás nikdy nebudeme chtít heslo ani údaje o platební kartě.",
    "trust_call": "V případě pochybností nám zavolejte na číslo $phone.",
    "language_label": "Jazyk",
}

HU: Messages = {
    "title_restricted": "Korlátozott internetszolgáltatás",
    "heading_restricted": "Az Ön internetszolgáltatása korlátozva van",
    "summary_restricted": "A weboldalak elérése korlátozott, amíg fiókja nincs rendezve.",
    "title_notice": "Fontos értesítés az internetszolgáltatásáról",
    "heading_notice": "Fontos értesítésünk van az Ön számára",
    "summary_notice": "Kérjük, olvassa el ezt az értesítést. Ezután továbbléphet az internetre.",
    "title_throttle": "Csökkentett sebességű kapcsolat",
    "heading_throttle": "Internetkapcsolatának sebessége csökkentve van",
    "summary_throttle": "Kapcsolata csökkentett sebességgel működik, amíg fiókja nincs rendezve. "
                        "Az értesítés elolvasása után továbbléphet az internetre.",
    "title_acknowledged": "Folytathatja",
    "heading_acknowledged": "Folytathatja a böngészést",
    "summary_acknowledged": "Köszönjük, hogy elolvasta az értesítést. Most már újra használhatja az internetet.",
    "title_active": "Az internetszolgáltatás aktív",
    "heading_active": "Szolgáltatása aktív",
    "summary_active": "Internet-hozzáférése nincs korlátozva. Ha egy oldal nem töltődött be, "
                      "kérjük, próbálja újra.",
    "reason_overdue": "Ok: egy esedékes befizetése elmaradt.",
    "reason_suspended": "Ok: szolgáltatását felfüggesztettük.",
    "reason_notice": "Ok: szolgáltatójának fontos közlendője van a fiókjával kapcsolatban.",
    "reason_fair_use": "Ok: szolgáltatása elérte a méltányos használati (fair use) korlátot.",
    "reason_security": "Ok: biztonsági problémát észleltünk az Ön kapcsolatán.",
    "reason_verification": "Ok: fiókja néhány adatát ellenőriznünk kell.",
    "reason_other": "Ok: fiókja figyelmet igényel.",
    "pay_heading": "Fizetési lehetőségek",
    "pay_online": "Online fizetés:",
    "pay_contact": "Fiókja rendezéséhez kérjük, vegye fel a kapcsolatot szolgáltatójával.",
    "pay_restore": "A befizetés beérkezése után a teljes szolgáltatás automatikusan helyreáll.",
    "continue_intro": "Az értesítés elolvasása után továbbléphet az internetre. "
                      "Az értesítés újra megjelenhet, amíg az ügy nem rendeződik.",
    "continue_button": "Tovább az internetre",
    "continue_not_needed": "Ehhez a kapcsolathoz nincs megerősítendő értesítés.",
    "continue_failed": "Ezt a lépést most nem sikerült végrehajtani. Kérjük, próbálja újra egy kis idő múlva.",
    "promise_heading": "Egy kis haladékra van szüksége?",
    "promise_intro": "Ha most nem tud fizetni, fizetési ígéretet tehet, és szolgáltatását $term teljes "
                     "egészében visszakapja. Ha addig nem érkezik meg a befizetés, a szolgáltatás ismét "
                     "korlátozva lesz.",
    "promise_button": "Ígérem, hogy fizetek",
    "promise_refused_soon": "Fizetési ígéretet ilyen hamar nem tehet újra. Kérjük, fizessen a szolgáltatás "
                            "visszaállításához, vagy lépjen kapcsolatba velünk.",
    "promise_refused": "Ennél a kapcsolatnál nem tehető fizetési ígéret. Kérjük, fizessen a szolgáltatás "
                       "visszaállításához, vagy lépjen kapcsolatba velünk.",
    "promise_not_needed": "Szolgáltatása jelenleg nincs korlátozva, így nincs mit megígérnie.",
    "reload_needed": "Kérjük, töltse be újra ezt az oldalt, majd nyomja meg ismét a gombot.",
    "back_to_page": "Tovább a kért oldalra:",
    "title_promised": "Szolgáltatás visszaállítva",
    "heading_promised": "Szolgáltatása újra működik",
    "summary_promised": "Szolgáltatása eddig működik: $until. Kérjük, addig fizessen, különben ismét "
                        "korlátozva lesz.",
    "title_expired": "Az oldal érvényessége lejárt",
    "summary_expired": "Biztonsági okokból a gomb csak korlátozott ideig működik. "
                       "Kérjük, nyissa meg újra az oldalt, és nyomja meg ismét a gombot.",
    "title_too_many": "Túl sok próbálkozás",
    "summary_too_many": "Kérjük, várjon egy percet, majd próbálja újra.",
    "back_link": "Az oldal újbóli megnyitása",
    "contact_heading": "Kapcsolat",
    "contact_phone": "Telefon",
    "contact_email": "E-mail",
    "contact_hours": "Ügyfélszolgálati idő",
    "reference_label": "Hivatkozási kód",
    "reference_hint": "Kérjük, adja meg, amikor kapcsolatba lép velünk.",
    "account_heading": "Az Ön kapcsolata",
    "account_label": "Ügyfélazonosító",
    "address_label": "IP-cím",
    "trust_named": "Ezt az oldalt az Ön internetszolgáltatója jeleníti meg: $provider.",
    "trust_unnamed": "Ezt az oldalt az Ön internetszolgáltatója jeleníti meg.",
    "trust_never": "Ezen az oldalon soha nem kérjük el jelszavát vagy bankkártyaadatait.",
    "trust_call": "Ha kétségei vannak, hívjon minket a következő számon: $phone.",
    "language_label": "Nyelv",
}

ES: Messages = {
    "title_restricted": "Servicio de internet restringido",
    "heading_restricted": "Su servicio de internet está restringido",
    "summary_restricted": "El acceso a la web está limitado hasta que se regularice su cuenta.",
    "title_notice": "Aviso importante sobre su servicio de internet",
    "heading_notice": "Tenemos un aviso importante para usted",
    "summary_notice": "Lea este aviso, por favor. Después podrá continuar a internet.",
    "title_throttle": "Velocidad de conexión reducida",
    "heading_throttle": "La velocidad de su conexión está reducida",
    "summary_throttle": "Su conexión funciona a velocidad reducida hasta que se regularice su cuenta. "
                        "Después de leer este aviso podrá continuar a internet.",
    "title_acknowledged": "Puede continuar",
    "heading_acknowledged": "Puede seguir navegando",
    "summary_acknowledged": "Gracias por leer el aviso. Ya puede volver a usar internet.",
    "title_active": "Servicio de internet activo",
    "heading_active": "Su servicio está activo",
    "summary_active": "Su acceso a internet no está restringido. Si una página no se ha cargado, "
                      "inténtelo de nuevo.",
    "reason_overdue": "Motivo: hay un pago vencido en su cuenta.",
    "reason_suspended": "Motivo: su servicio ha sido suspendido.",
    "reason_notice": "Motivo: su proveedor tiene un aviso importante sobre su cuenta.",
    "reason_fair_use": "Motivo: su servicio ha alcanzado el límite de uso razonable.",
    "reason_security": "Motivo: hemos detectado un problema de seguridad en su conexión.",
    "reason_verification": "Motivo: necesitamos confirmar algunos datos de su cuenta.",
    "reason_other": "Motivo: su cuenta requiere atención.",
    "pay_heading": "Cómo pagar",
    "pay_online": "Pague en línea:",
    "pay_contact": "Póngase en contacto con su proveedor para regularizar su cuenta.",
    "pay_restore": "En cuanto recibamos su pago, el servicio completo se restablecerá automáticamente.",
    "continue_intro": "Cuando haya leído este aviso, puede continuar a internet. "
                      "El aviso puede volver a aparecer hasta que se resuelva la situación.",
    "continue_button": "Continuar a internet",
    "continue_not_needed": "No hay ningún aviso que confirmar para esta conexión.",
    "continue_failed": "No hemos podido completar este paso en este momento. "
                       "Inténtelo de nuevo en unos instantes.",
    "promise_heading": "¿Necesita un poco más de tiempo?",
    "promise_intro": "Si ahora no puede pagar, puede comprometerse a pagar y recuperar el servicio completo "
                     "durante $term. Si para entonces no hemos recibido el pago, el servicio volverá a "
                     "restringirse.",
    "promise_button": "Me comprometo a pagar",
    "promise_refused_soon": "No es posible volver a comprometerse a pagar tan pronto. "
                            "Pague para restablecer el servicio o póngase en contacto con nosotros.",
    "promise_refused": "El compromiso de pago no está disponible para esta conexión. "
                       "Pague para restablecer el servicio o póngase en contacto con nosotros.",
    "promise_not_needed": "Su servicio no está restringido en este momento, así que no hay nada que prometer.",
    "reload_needed": "Vuelva a cargar esta página y pulse el botón otra vez.",
    "back_to_page": "Continuar a la página que había solicitado:",
    "title_promised": "Servicio restablecido",
    "heading_promised": "Su servicio vuelve a funcionar",
    "summary_promised": "Su servicio funciona hasta el $until. Pague antes de esa fecha o volverá a "
                        "restringirse.",
    "title_expired": "Esta página ha caducado",
    "summary_expired": "Por su seguridad, el botón solo funciona durante un tiempo limitado. "
                       "Abra de nuevo la página y vuelva a pulsarlo.",
    "title_too_many": "Demasiados intentos",
    "summary_too_many": "Espere un minuto y vuelva a intentarlo.",
    "back_link": "Abrir de nuevo la página",
    "contact_heading": "Contacto",
    "contact_phone": "Teléfono",
    "contact_email": "Correo electrónico",
    "contact_hours": "Horario",
    "reference_label": "Código de referencia",
    "reference_hint": "Indíquelo cuando se ponga en contacto con nosotros.",
    "account_heading": "Su conexión",
    "account_label": "Número de cliente",
    "address_label": "Dirección IP",
    "trust_named": "Esta página la muestra su proveedor de internet, $provider.",
    "trust_unnamed": "Esta página la muestra su proveedor de internet.",
    "trust_never": "Nunca le pediremos su contraseña ni los datos de su tarjeta en esta página.",
    "trust_call": "Si tiene dudas, llámenos al $phone.",
    "language_label": "Idioma",
}

UK: Messages = {
    "title_restricted": "Інтернет-послугу обмежено",
    "heading_restricted": "Ваш доступ до інтернету обмежено",
    "summary_restricted": "Доступ до вебсайтів обмежено, доки стан вашого особового рахунку "
                          "не буде врегульовано.",
    "title_notice": "Важливе повідомлення щодо вашої інтернет-послуги",
    "heading_notice": "Маємо для вас важливе повідомлення",
    "summary_notice": "Будь ласка, прочитайте це повідомлення. Після цього ви зможете "
                      "продовжити користуватися інтернетом.",
    "title_throttle": "Швидкість з’єднання знижено",
    "heading_throttle": "Швидкість вашого з’єднання знижено",
    "summary_throttle": "Ваше з’єднання працює зі зниженою швидкістю, доки стан вашого особового "
                        "рахунку не буде врегульовано. Прочитавши це повідомлення, ви зможете "
                        "продовжити користуватися інтернетом.",
    "title_acknowledged": "Можна продовжити",
    "heading_acknowledged": "Ви можете продовжити перегляд",
    "summary_acknowledged": "Дякуємо, що прочитали повідомлення. Тепер ви знову можете "
                            "користуватися інтернетом.",
    "title_active": "Інтернет-послуга активна",
    "heading_active": "Ваша послуга активна",
    "summary_active": "Ваш доступ до інтернету не обмежено. Якщо сторінка не завантажилася, "
                      "спробуйте ще раз.",
    "reason_overdue": "Причина: на вашому рахунку є прострочений платіж.",
    "reason_suspended": "Причина: надання вашої послуги призупинено.",
    "reason_notice": "Причина: ваш провайдер має важливе повідомлення щодо вашого особового рахунку.",
    "reason_fair_use": "Причина: вичерпано ліміт справедливого використання вашої послуги.",
    "reason_security": "Причина: на вашому з’єднанні виявлено проблему безпеки.",
    "reason_verification": "Причина: нам потрібно підтвердити деякі дані вашого особового рахунку.",
    "reason_other": "Причина: ваш особовий рахунок потребує уваги.",
    "pay_heading": "Як оплатити",
    "pay_online": "Оплатити онлайн:",
    "pay_contact": "Зверніться до свого провайдера, щоб урегулювати стан рахунку.",
    "pay_restore": "Щойно ми отримаємо ваш платіж, повний доступ буде відновлено автоматично.",
    "continue_intro": "Прочитавши це повідомлення, ви можете продовжити користуватися інтернетом. "
                      "Повідомлення може з’являтися знову, доки питання не буде вирішено.",
    "continue_button": "Перейти до інтернету",
    "continue_not_needed": "Для цього з’єднання немає повідомлення, яке потрібно підтвердити.",
    "continue_failed": "Зараз не вдалося виконати цей крок. Будь ласка, спробуйте ще раз за хвилину.",
    "promise_heading": "Потрібно трохи більше часу?",
    "promise_intro": "Якщо ви не можете оплатити зараз, ви можете пообіцяти оплату й отримати повний доступ "
                     "на $term. Якщо до того часу оплата не надійде, доступ знову буде обмежено.",
    "promise_button": "Обіцяю оплатити",
    "promise_refused_soon": "Пообіцяти оплату знову так скоро не можна. Будь ласка, оплатіть, щоб відновити "
                            "послугу, або зверніться до нас.",
    "promise_refused": "Обіцянка оплати недоступна для цього підключення. Будь ласка, оплатіть, щоб відновити "
                       "послугу, або зверніться до нас.",
    "promise_not_needed": "Ваша послуга зараз не обмежена, тож обіцяти нічого не потрібно.",
    "reload_needed": "Будь ласка, перезавантажте цю сторінку й натисніть кнопку ще раз.",
    "back_to_page": "Перейти на сторінку, яку ви відкривали:",
    "title_promised": "Послугу відновлено",
    "heading_promised": "Ваша послуга знову працює",
    "summary_promised": "Ваша послуга працює до $until. Будь ласка, оплатіть до цього часу, інакше її знову "
                        "буде обмежено.",
    "title_expired": "Термін дії сторінки минув",
    "summary_expired": "З міркувань безпеки кнопка діє лише обмежений час. Будь ласка, відкрийте "
                       "сторінку знову й натисніть кнопку ще раз.",
    "title_too_many": "Забагато спроб",
    "summary_too_many": "Будь ласка, зачекайте хвилину й спробуйте знову.",
    "back_link": "Відкрити сторінку знову",
    "contact_heading": "Контакти",
    "contact_phone": "Телефон",
    "contact_email": "Електронна пошта",
    "contact_hours": "Години роботи",
    "reference_label": "Довідковий код",
    "reference_hint": "Будь ласка, назвіть його, коли звертатиметеся до нас.",
    "account_heading": "Ваше з’єднання",
    "account_label": "Номер особового рахунку",
    "address_label": "IP-адреса",
    "trust_named": "Цю сторінку показує ваш інтернет-провайдер $provider.",
    "trust_unnamed": "Цю сторінку показує ваш інтернет-провайдер.",
    "trust_never": "На цій сторінці ми ніколи не попросимо ваш пароль або дані платіжної картки.",
    "trust_call": "Якщо маєте сумніви, зателефонуйте нам за номером $phone.",
    "language_label": "Мова",
}

RU: Messages = {
    "title_restricted": "Доступ в интернет ограничен",
    "heading_restricted": "Ваш доступ в интернет ограничен",
    "summary_restricted": "Доступ к сайтам ограничен, пока состояние вашего лицевого счёта "
                          "не будет урегулировано.",
    "title_notice": "Важное уведомление о вашей интернет-услуге",
    "heading_notice": "У нас есть для вас важное уведомление",
    "summary_notice": "Пожалуйста, прочитайте это уведомление. После этого вы сможете "
                      "продолжить пользоваться интернетом.",
    "title_throttle": "Скорость соединения снижена",
    "heading_throttle": "Скорость вашего соединения снижена",
    "summary_throttle": "Ваше соединение работает на сниженной скорости, пока состояние вашего "
                        "лицевого счёта не будет урегулировано. Прочитав это уведомление, вы сможете "
                        "продолжить пользоваться интернетом.",
    "title_acknowledged": "Можно продолжить",
    "heading_acknowledged": "Вы можете продолжить работу в интернете",
    "summary_acknowledged": "Спасибо, что прочитали уведомление. Теперь вы снова можете "
                            "пользоваться интернетом.",
    "title_active": "Интернет-услуга активна",
    "heading_active": "Ваша услуга активна",
    "summary_active": "Ваш доступ в интернет не ограничен. Если страница не загрузилась, "
                      "попробуйте ещё раз.",
    "reason_overdue": "Причина: на вашем счёте есть просроченный платёж.",
    "reason_suspended": "Причина: предоставление вашей услуги приостановлено.",
    "reason_notice": "Причина: у вашего провайдера есть важное уведомление по вашему лицевому счёту.",
    "reason_fair_use": "Причина: исчерпан лимит справедливого использования вашей услуги.",
    "reason_security": "Причина: на вашем подключении обнаружена проблема безопасности.",
    "reason_verification": "Причина: нам нужно подтвердить некоторые данные вашего лицевого счёта.",
    "reason_other": "Причина: ваш лицевой счёт требует внимания.",
    "pay_heading": "Как оплатить",
    "pay_online": "Оплатить онлайн:",
    "pay_contact": "Свяжитесь с вашим провайдером, чтобы урегулировать состояние счёта.",
    "pay_restore": "Как только мы получим ваш платёж, полный доступ восстановится автоматически.",
    "continue_intro": "Прочитав это уведомление, вы можете продолжить пользоваться интернетом. "
                      "Уведомление может появляться снова, пока вопрос не будет решён.",
    "continue_button": "Перейти в интернет",
    "continue_not_needed": "Для этого подключения нет уведомления, которое нужно подтвердить.",
    "continue_failed": "Сейчас не удалось выполнить этот шаг. Пожалуйста, попробуйте ещё раз через минуту.",
    "promise_heading": "Нужно немного больше времени?",
    "promise_intro": "Если вы не можете оплатить сейчас, вы можете пообещать оплату и получить полный доступ "
                     "на $term. Если к этому времени оплата не поступит, доступ снова будет ограничен.",
    "promise_button": "Обещаю оплатить",
    "promise_refused_soon": "Снова пообещать оплату так скоро нельзя. Пожалуйста, оплатите, чтобы восстановить "
                            "услугу, или свяжитесь с нами.",
    "promise_refused": "Обещание оплаты недоступно для этого подключения. Пожалуйста, оплатите, чтобы "
                       "восстановить услугу, или свяжитесь с нами.",
    "promise_not_needed": "Ваша услуга сейчас не ограничена, поэтому обещать ничего не нужно.",
    "reload_needed": "Пожалуйста, перезагрузите эту страницу и нажмите кнопку ещё раз.",
    "back_to_page": "Перейти на страницу, которую вы открывали:",
    "title_promised": "Услуга восстановлена",
    "heading_promised": "Ваша услуга снова работает",
    "summary_promised": "Ваша услуга работает до $until. Пожалуйста, оплатите до этого времени, иначе она "
                        "снова будет ограничена.",
    "title_expired": "Срок действия страницы истёк",
    "summary_expired": "В целях безопасности кнопка действует ограниченное время. Пожалуйста, "
                       "откройте страницу снова и нажмите кнопку ещё раз.",
    "title_too_many": "Слишком много попыток",
    "summary_too_many": "Пожалуйста, подождите минуту и попробуйте снова.",
    "back_link": "Открыть страницу снова",
    "contact_heading": "Контакты",
    "contact_phone": "Телефон",
    "contact_email": "Электронная почта",
    "contact_hours": "Часы работы",
    "reference_label": "Справочный код",
    "reference_hint": "Пожалуйста, назовите его, когда будете обращаться к нам.",
    "account_heading": "Ваше подключение",
    "account_label": "Номер лицевого счёта",
    "address_label": "IP-адрес",
    "trust_named": "Эту страницу показывает ваш интернет-провайдер $provider.",
    "trust_unnamed": "Эту страницу показывает ваш интернет-провайдер.",
    "trust_never": "На этой странице мы никогда не попросим ваш пароль или данные банковской карты.",
    "trust_call": "Если сомневаетесь, позвоните нам по номеру $phone.",
    "language_label": "Язык",
}

PT: Messages = {
    "title_restricted": "Serviço de internet restrito",
    "heading_restricted": "O seu serviço de internet está restrito",
    "summary_restricted": "O acesso à web está limitado até que a sua conta seja regularizada.",
    "title_notice": "Aviso importante sobre o seu serviço de internet",
    "heading_notice": "Temos um aviso importante para si",
    "summary_notice": "Por favor, leia este aviso. Depois poderá continuar para a internet.",
    "title_throttle": "Velocidade de ligação reduzida",
    "heading_throttle": "A velocidade da sua ligação está reduzida",
    "summary_throttle": "A sua ligação está a funcionar com velocidade reduzida até que a sua conta "
                        "seja regularizada. Depois de ler este aviso, poderá continuar para a internet.",
    "title_acknowledged": "Pode continuar",
    "heading_acknowledged": "Pode continuar a navegar",
    "summary_acknowledged": "Obrigado por ler o aviso. Já pode voltar a utilizar a internet.",
    "title_active": "Serviço de internet ativo",
    "heading_active": "O seu serviço está ativo",
    "summary_active": "O seu acesso à internet não está restrito. Se uma página não carregou, "
                      "tente novamente.",
    "reason_overdue": "Motivo: existe um pagamento em atraso na sua conta.",
    "reason_suspended": "Motivo: o seu serviço foi suspenso.",
    "reason_notice": "Motivo: o seu fornecedor tem um aviso importante sobre a sua conta.",
    "reason_fair_use": "Motivo: o seu serviço atingiu o limite de utilização razoável.",
    "reason_security": "Motivo: detetámos um problema de segurança na sua ligação.",
    "reason_verification": "Motivo: precisamos de confirmar alguns dados da sua conta.",
    "reason_other": "Motivo: a sua conta requer atenção.",
    "pay_heading": "Como pagar",
    "pay_online": "Pagar online:",
    "pay_contact": "Contacte o seu fornecedor para regularizar a sua conta.",
    "pay_restore": "Assim que recebermos o seu pagamento, o serviço completo é reposto automaticamente.",
    "continue_intro": "Depois de ler este aviso, pode continuar para a internet. "
                      "O aviso pode voltar a aparecer até que a situação fique resolvida.",
    "continue_button": "Continuar para a internet",
    "continue_not_needed": "Não há nenhum aviso a confirmar para esta ligação.",
    "continue_failed": "Não foi possível concluir este passo neste momento. "
                       "Tente novamente dentro de instantes.",
    "promise_heading": "Precisa de um pouco mais de tempo?",
    "promise_intro": "Se não puder pagar agora, pode comprometer-se a pagar e recuperar o serviço completo "
                     "durante $term. Se o pagamento não chegar até lá, o serviço volta a ser restrito.",
    "promise_button": "Comprometo-me a pagar",
    "promise_refused_soon": "Não é possível voltar a comprometer-se a pagar tão cedo. "
                            "Pague para repor o serviço ou contacte-nos.",
    "promise_refused": "O compromisso de pagamento não está disponível para esta ligação. "
                       "Pague para repor o serviço ou contacte-nos.",
    "promise_not_needed": "O seu serviço não está restrito neste momento, por isso não há nada a prometer.",
    "reload_needed": "Por favor, recarregue esta página e carregue novamente no botão.",
    "back_to_page": "Continuar para a página que pediu:",
    "title_promised": "Serviço reposto",
    "heading_promised": "O seu serviço voltou",
    "summary_promised": "O seu serviço funciona até $until. Pague até essa data, caso contrário voltará a "
                        "ser restrito.",
    "title_expired": "Esta página expirou",
    "summary_expired": "Por motivos de segurança, o botão só funciona durante um tempo limitado. "
                       "Abra novamente a página e carregue no botão outra vez.",
    "title_too_many": "Demasiadas tentativas",
    "summary_too_many": "Aguarde um minuto e tente novamente.",
    "back_link": "Abrir novamente a página",
    "contact_heading": "Contacto",
    "contact_phone": "Telefone",
    "contact_email": "E-mail",
    "contact_hours": "Horário",
    "reference_label": "Código de referência",
    "reference_hint": "Indique-o quando nos contactar.",
    "account_heading": "A sua ligação",
    "account_label": "Número de cliente",
    "address_label": "Endereço IP",
    "trust_named": "Esta página é apresentada pelo seu fornecedor de internet, $provider.",
    "trust_unnamed": "Esta página é apresentada pelo seu fornecedor de internet.",
    "trust_never": "Nesta página nunca lhe pediremos a sua palavra-passe nem os dados do seu cartão.",
    "trust_call": "Em caso de dúvida, ligue-nos para o $phone.",
    "language_label": "Idioma",
}

#: The built-in catalogues; ``branding.catalogue`` lays ``portal.texts`` over them.
MESSAGES: dict[str, Messages] = {"en": EN, "cs": CS, "hu": HU, "es": ES, "uk": UK, "ru": RU, "pt": PT}


def reason_key(reason: str) -> ReasonKey:
    """The sentence for a billing reason: ``"Fair-Use"`` → ``reason_fair_use``; unknown → other."""
    normal = reason.strip().lower().replace("-", "_").replace(" ", "_")
    return REASONS.get(normal, "reason_other")
