-- One database per service: no service reads another's tables.
CREATE DATABASE message_service;
CREATE DATABASE notification_router;
CREATE DATABASE push_sender;
CREATE DATABASE email_sender;
